//! Groups: create, add, remove, leave, look up. Each change runs in one write
//! transaction and checks permission first (`forbidden` before `conflict` or
//! `not_found` of a member), as the contract orders the answers.

use std::collections::BTreeSet;

use diesel::prelude::*;

use crate::db::conn::{on_backend, write_txn, DbConn};
use crate::db::models::{Membership, NewConversation, NewMember};
use crate::db::schema::{chat_groups, conversations, members};
use crate::error::ChatError;
use crate::ids::{ConvKey, GroupId, UserId};
use crate::protocol::{GroupView, MAX_GROUP_MEMBERS};

#[derive(Insertable)]
#[diesel(table_name = chat_groups)]
struct NewGroup<'a> {
    id: &'a str,
    name: &'a str,
    owner: &'a str,
    created_at: i64,
}

fn conv_of(g: &GroupId) -> String {
    ConvKey::Group(g.clone()).to_string()
}

/// Create a group owned by `owner` with `members` (the owner always included).
pub fn create(
    conn: &mut DbConn,
    group: &GroupId,
    name: &str,
    owner: &UserId,
    members_in: &[UserId],
) -> Result<GroupView, ChatError> {
    let now = crate::now_ms();
    let conv = conv_of(group);
    let mut all: BTreeSet<&str> = members_in.iter().map(UserId::as_str).collect();
    all.insert(owner.as_str());
    if all.len() > MAX_GROUP_MEMBERS {
        return Err(ChatError::bad_request(format!(
            "a group has at most {MAX_GROUP_MEMBERS} members"
        )));
    }
    write_txn(conn, |c| {
        let exists: bool =
            diesel::select(diesel::dsl::exists(chat_groups::table.find(group.as_str())))
                .get_result(c)?;
        if exists {
            return Err(ChatError::conflict(format!("group {group} already exists")));
        }
        diesel::insert_into(chat_groups::table)
            .values(&NewGroup {
                id: group.as_str(),
                name,
                owner: owner.as_str(),
                created_at: now,
            })
            .execute(c)?;
        // A conversation row may be left from nothing else; insert-or-ignore keeps its counter.
        let nc = [NewConversation {
            conv: &conv,
            last_seq: 0,
            created_at: now,
        }];
        on_backend!(&mut *c, inner => diesel::insert_or_ignore_into(conversations::table).values(&nc[..]).execute(inner))?;
        let last = last_seq(c, &conv)?;
        let rows: Vec<NewMember> = all
            .iter()
            .map(|u| NewMember {
                conv: &conv,
                user_id: u,
                joined_seq: last,
                left_seq: None,
                delivered_seq: last,
                gap_from: None,
                gap_to: None,
                joined_at: now,
            })
            .collect();
        on_backend!(&mut *c, inner => diesel::insert_into(members::table).values(&rows).execute(inner))?;
        Ok(GroupView {
            group: group.to_string(),
            name: name.to_string(),
            owner: owner.to_string(),
            members: all.iter().map(|s| s.to_string()).collect(),
        })
    })
}

fn last_seq(c: &mut DbConn, conv: &str) -> QueryResult<i64> {
    conversations::table
        .find(conv)
        .select(conversations::last_seq)
        .first(c)
}

fn owner_of(c: &mut DbConn, group: &GroupId) -> Result<String, ChatError> {
    chat_groups::table
        .find(group.as_str())
        .select(chat_groups::owner)
        .first::<String>(c)
        .optional()?
        .ok_or_else(|| ChatError::not_found(format!("no group {group}")))
}

/// Whether `user` is a member now, and whether a row exists at all.
fn member_state(c: &mut DbConn, conv: &str, user: &UserId) -> QueryResult<Option<Option<i64>>> {
    members::table
        .find((conv, user.as_str()))
        .select(members::left_seq)
        .first::<Option<i64>>(c)
        .optional()
}

/// Add `user` to `group`. `by`: the user asking (must be the owner), or `None`
/// for the server API.
pub fn add(
    conn: &mut DbConn,
    by: Option<&UserId>,
    group: &GroupId,
    user: &UserId,
) -> Result<(), ChatError> {
    let now = crate::now_ms();
    let conv = conv_of(group);
    write_txn(conn, |c| {
        let owner = owner_of(c, group)?;
        if matches!(by, Some(b) if b.as_str() != owner) {
            return Err(ChatError::forbidden(format!(
                "only the owner of {group} adds members"
            )));
        }
        let last = last_seq(c, &conv)?;
        match member_state(c, &conv, user)? {
            Some(None) => Err(ChatError::conflict(format!(
                "{user} is already a member of {group}"
            ))),
            Some(Some(_)) => {
                let m = crate::db::queries::messages::membership(
                    c,
                    &ConvKey::Group(group.clone()),
                    user,
                )?
                .ok_or_else(|| ChatError::unavailable("membership vanished"))?;
                let (joined, gap) = returning_window(&m, last);
                diesel::update(members::table.find((&conv, user.as_str())))
                    .set((
                        members::joined_seq.eq(joined),
                        members::left_seq.eq(None::<i64>),
                        members::gap_from.eq(gap.map(|g| g.0)),
                        members::gap_to.eq(gap.map(|g| g.1)),
                        members::joined_at.eq(now),
                    ))
                    .execute(c)?;
                Ok(())
            }
            None => {
                let row = [NewMember {
                    conv: &conv,
                    user_id: user.as_str(),
                    joined_seq: last,
                    left_seq: None,
                    delivered_seq: last,
                    gap_from: None,
                    gap_to: None,
                    joined_at: now,
                }];
                on_backend!(&mut *c, inner => diesel::insert_into(members::table).values(&row[..]).execute(inner))?;
                Ok(())
            }
        }
    })
}

/// The window of a member who comes back at `last`: what they had not yet
/// acknowledged of their earlier membership stays theirs; the time away
/// becomes the gap. One gap is kept: if an earlier gap's first part is still
/// unacknowledged too, that part is given up (logged).
fn returning_window(m: &Membership, last: i64) -> (i64, Option<(i64, i64)>) {
    let left = m.left_seq.unwrap_or(last);
    if m.delivered_seq >= left {
        return (last, None);
    }
    match (m.gap_from, m.gap_to) {
        (Some(from), Some(to)) => {
            if m.delivered_seq < from {
                log::warn!("a member returning a second time loses messages {}..={from} they never acknowledged", m.delivered_seq + 1);
            }
            (to, Some((left, last)))
        }
        _ => (m.joined_seq, Some((left, last))),
    }
}

/// Remove `user` from `group` (by its owner, or the API when `by` is `None`).
pub fn remove(
    conn: &mut DbConn,
    by: Option<&UserId>,
    group: &GroupId,
    user: &UserId,
) -> Result<(), ChatError> {
    let conv = conv_of(group);
    write_txn(conn, |c| {
        let owner = owner_of(c, group)?;
        if matches!(by, Some(b) if b.as_str() != owner) {
            return Err(ChatError::forbidden(format!(
                "only the owner of {group} removes members"
            )));
        }
        if user.as_str() == owner {
            return Err(ChatError::forbidden("the owner cannot be removed"));
        }
        if member_state(c, &conv, user)? != Some(None) {
            return Err(ChatError::not_found(format!(
                "{user} is not a member of {group}"
            )));
        }
        close_membership(c, &conv, user)
    })
}

/// `user` leaves `group` (the owner cannot).
pub fn leave(conn: &mut DbConn, user: &UserId, group: &GroupId) -> Result<(), ChatError> {
    let conv = conv_of(group);
    write_txn(conn, |c| {
        let owner = owner_of(c, group)?;
        if member_state(c, &conv, user)? != Some(None) {
            return Err(ChatError::forbidden(format!(
                "you are not a member of {group}"
            )));
        }
        if user.as_str() == owner {
            return Err(ChatError::forbidden("the owner cannot leave the group"));
        }
        close_membership(c, &conv, user)
    })
}

fn close_membership(c: &mut DbConn, conv: &str, user: &UserId) -> Result<(), ChatError> {
    let last = last_seq(c, conv)?;
    diesel::update(members::table.find((conv, user.as_str())))
        .set(members::left_seq.eq(Some(last)))
        .execute(c)?;
    Ok(())
}

/// One group with its current members, or `not_found`.
pub fn get(conn: &mut DbConn, group: &GroupId) -> Result<GroupView, ChatError> {
    let (id, name, owner): (String, String, String) = chat_groups::table
        .find(group.as_str())
        .select((chat_groups::id, chat_groups::name, chat_groups::owner))
        .first(conn)
        .optional()?
        .ok_or_else(|| ChatError::not_found(format!("no group {group}")))?;
    let members = members::table
        .filter(members::conv.eq(conv_of(group)))
        .filter(members::left_seq.is_null())
        .select(members::user_id)
        .order(members::user_id.asc())
        .load::<String>(conn)?;
    Ok(GroupView {
        group: id,
        name,
        owner,
        members,
    })
}

/// Every group with its current members (the ChatServer's cache at start-up).
pub fn all(conn: &mut DbConn) -> QueryResult<Vec<GroupView>> {
    let groups: Vec<(String, String, String)> = chat_groups::table
        .select((chat_groups::id, chat_groups::name, chat_groups::owner))
        .order(chat_groups::id.asc())
        .load(conn)?;
    let rows: Vec<(String, String)> = members::table
        .filter(members::conv.like("group:%"))
        .filter(members::left_seq.is_null())
        .select((members::conv, members::user_id))
        .order((members::conv.asc(), members::user_id.asc()))
        .load(conn)?;
    let mut by_group: std::collections::HashMap<String, Vec<String>> =
        std::collections::HashMap::new();
    for (conv, user) in rows {
        if let Some(g) = conv.strip_prefix("group:") {
            by_group.entry(g.to_string()).or_default().push(user);
        }
    }
    Ok(groups
        .into_iter()
        .map(|(id, name, owner)| {
            let members = by_group.remove(&id).unwrap_or_default();
            GroupView {
                group: id,
                name,
                owner,
                members,
            }
        })
        .collect())
}

/// The groups `user` is a member of now.
pub fn of_user(conn: &mut DbConn, user: &UserId) -> Result<Vec<GroupView>, ChatError> {
    let convs: Vec<String> = members::table
        .filter(members::user_id.eq(user.as_str()))
        .filter(members::conv.like("group:%"))
        .filter(members::left_seq.is_null())
        .select(members::conv)
        .load(conn)?;
    let mut out = Vec::with_capacity(convs.len());
    for conv in convs {
        if let Some(g) = conv
            .strip_prefix("group:")
            .and_then(|g| GroupId::parse(g).ok())
        {
            out.push(get(conn, &g)?);
        }
    }
    Ok(out)
}
