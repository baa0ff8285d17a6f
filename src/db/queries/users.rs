//! Users seen, and the people a user has direct conversations with (for presence).

use diesel::prelude::*;

use crate::db::conn::{on_backend, DbConn};
use crate::db::schema::{members, users};
use crate::ids::{ConvKey, UserId};

#[derive(Insertable)]
#[diesel(table_name = users)]
struct NewUser<'a> {
    id: &'a str,
    first_seen: i64,
    last_seen: i64,
}

/// Record that `user` connected now.
pub fn touch(conn: &mut DbConn, user: &UserId) -> QueryResult<()> {
    let now = crate::now_ms();
    let row = [NewUser {
        id: user.as_str(),
        first_seen: now,
        last_seen: now,
    }];
    let inserted = on_backend!(&mut *conn, c => diesel::insert_or_ignore_into(users::table).values(&row[..]).execute(c))?;
    if inserted == 0 {
        diesel::update(users::table.find(user.as_str()))
            .set(users::last_seen.eq(now))
            .execute(conn)?;
    }
    Ok(())
}

/// Everyone `user` has a direct conversation with (one with at least one message).
pub fn dm_peers(conn: &mut DbConn, user: &UserId) -> QueryResult<Vec<UserId>> {
    let convs: Vec<String> = members::table
        .filter(members::user_id.eq(user.as_str()))
        .filter(members::conv.like("dm:%"))
        .select(members::conv)
        .load(conn)?;
    Ok(convs
        .iter()
        .filter_map(|k| match ConvKey::parse(k) {
            Ok(ConvKey::Direct(a, b)) => Some(if &a == user { b } else { a }),
            _ => None,
        })
        .filter(|p| p != user)
        .collect())
}
