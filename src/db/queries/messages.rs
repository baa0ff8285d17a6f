//! Storing messages (seq allocation and idempotency), history pages, the
//! undelivered backlog and delivery acknowledgements.

use std::collections::{BTreeMap, HashMap, HashSet};

use diesel::prelude::*;

use crate::db::conn::{on_backend, write_txn, DbConn};
use crate::db::models::{
    Membership, MessageRow, NewConversation, NewMember, NewMessage, NewMessageRow, Stored,
};
use crate::db::schema::{chat_groups, conversations, members, messages};
use crate::error::ChatError;
use crate::ids::{ConvKey, GroupId, Target, UserId};

/// Outcome per message of a batch, in the batch's order.
pub type BatchResult = Vec<Result<Stored, ChatError>>;

const MAX_ATTEMPTS: usize = 5;

/// Store a batch of messages in one transaction: each conversation's seqs
/// allocated from its `last_seq`, read with the row locked and written back in
/// one statement, then the rows in multi-row INSERTs (of at most 128 rows).
/// A message whose `(sender, client_id)` is already stored is not stored again
/// (its original place comes back with `duplicate`); a group message from a
/// non-member is `forbidden`, to a missing group `not_found`; the others still
/// commit. A database failure fails the whole batch (nothing stored).
pub fn store_batch(conn: &mut DbConn, batch: &[NewMessage]) -> Result<BatchResult, ChatError> {
    retrying(conn, "store batch", |c| store_batch_once(c, batch))
}

/// Run a write transaction, again (up to `MAX_ATTEMPTS`) when it failed in a
/// way that running it again fixes: a deadlock, or a unique clash with a
/// concurrent writer whose row the next attempt sees.
fn retrying<T>(
    conn: &mut DbConn,
    what: &str,
    mut f: impl FnMut(&mut DbConn) -> QueryResult<T>,
) -> Result<T, ChatError> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        match write_txn(conn, &mut f) {
            Err(e) if attempt < MAX_ATTEMPTS && super::is_retryable(&e) => {
                log::debug!("{what} retried after: {e}");
            }
            other => return other.map_err(ChatError::from),
        }
    }
}

fn store_batch_once(conn: &mut DbConn, batch: &[NewMessage]) -> QueryResult<BatchResult> {
    let now = crate::now_ms();
    let convs: Vec<ConvKey> = batch
        .iter()
        .map(|m| ConvKey::for_target(&m.sender, &m.to))
        .collect();
    let keys: Vec<String> = convs.iter().map(ConvKey::to_string).collect();
    let mut out: Vec<Option<Result<Stored, ChatError>>> = vec![None; batch.len()];

    // Idempotency: earlier sends with the same (sender, client_id), stored or
    // earlier in this batch. Both columns of the unique index, so the lookup
    // reads only candidates.
    let client_ids: Vec<&str> = batch
        .iter()
        .filter_map(|m| m.client_id.as_deref())
        .collect();
    let found: Vec<(String, Option<String>, String, i64, i64)> = if client_ids.is_empty() {
        Vec::new()
    } else {
        let senders = distinct(
            batch
                .iter()
                .filter(|m| m.client_id.is_some())
                .map(|m| m.sender.as_str()),
        );
        let q = shaped::KnownSends {
            client_ids: &client_ids,
            senders: &senders,
        };
        on_backend!(&mut *conn, c => q.load(c))?
    };
    let mut known: HashMap<(&str, &str), Stored> = HashMap::with_capacity(found.len());
    for (sender, cid, conv, seq, ts) in &found {
        if let (Some(cid), Ok(conv)) = (cid, ConvKey::parse(conv)) {
            let s = Stored {
                conv,
                seq: *seq,
                ts: *ts,
                duplicate: true,
            };
            known.insert((sender.as_str(), cid.as_str()), s);
        }
    }

    // Group sends: the sender must be a current member of an existing group.
    let group_convs = distinct(
        keys.iter()
            .zip(batch)
            .filter(|(_, m)| matches!(m.to, Target::Group(_)))
            .map(|(k, _)| k.as_str()),
    );
    let mut member_rows: Vec<(String, String)> = Vec::new();
    let mut existing_groups: HashSet<String> = HashSet::new();
    if !group_convs.is_empty() {
        let senders = distinct(
            batch
                .iter()
                .filter(|m| matches!(m.to, Target::Group(_)))
                .map(|m| m.sender.as_str()),
        );
        let q = shaped::CurrentMembers {
            convs: &group_convs,
            users: &senders,
        };
        member_rows = on_backend!(&mut *conn, c => q.load(c))?;
        let ids: Vec<&str> = group_convs
            .iter()
            .filter_map(|k| k.strip_prefix("group:"))
            .collect();
        let q = shaped::ExistingGroups { ids: &ids };
        existing_groups = on_backend!(&mut *conn, c => q.load::<String>(c))?
            .into_iter()
            .collect();
    }
    let allowed: HashSet<(&str, &str)> = member_rows
        .iter()
        .map(|(k, u)| (k.as_str(), u.as_str()))
        .collect();

    // Decide each message; count what each conversation will take.
    let mut take: BTreeMap<&str, i64> = BTreeMap::new();
    let mut same_as: Vec<Option<usize>> = vec![None; batch.len()];
    let mut first_of: HashMap<(&str, &str), usize> = HashMap::new();
    for (i, m) in batch.iter().enumerate() {
        if let Some(cid) = m.client_id.as_deref() {
            if let Some(s) = known.get(&(m.sender.as_str(), cid)) {
                out[i] = Some(Ok(s.clone()));
                continue;
            }
            if let Some(&j) = first_of.get(&(m.sender.as_str(), cid)) {
                same_as[i] = Some(j);
                continue;
            }
            first_of.insert((m.sender.as_str(), cid), i);
        }
        if let Target::Group(g) = &m.to {
            if !existing_groups.contains(g.as_str()) {
                out[i] = Some(Err(ChatError::not_found(format!("no group {g}"))));
                continue;
            }
            if !allowed.contains(&(keys[i].as_str(), m.sender.as_str())) {
                out[i] = Some(Err(ChatError::forbidden(format!(
                    "not a member of group {g}"
                ))));
                continue;
            }
        }
        *take.entry(keys[i].as_str()).or_default() += 1;
    }

    if !take.is_empty() {
        // Allocate: read the counters of the batch's conversations, locking
        // their rows (MariaDB: `FOR UPDATE`, taken in key order, so that
        // concurrent transactions lock rows in one order; SQLite: the
        // transaction already holds the write lock), then write the new
        // values in one statement. A direct conversation that has no row yet
        // comes into being here, with both parties as members.
        let conv_list: Vec<&str> = take.keys().copied().collect();
        let lock = locks_rows(conn);
        let q = shaped::Counters {
            convs: &conv_list,
            lock,
        };
        let mut last: HashMap<String, i64> =
            on_backend!(&mut *conn, c => q.load::<(String, i64)>(c))?
                .into_iter()
                .collect();
        let missing: Vec<&str> = conv_list
            .iter()
            .copied()
            .filter(|k| !last.contains_key(*k) && k.starts_with("dm:"))
            .collect();
        if !missing.is_empty() {
            create_direct(conn, &missing, now)?;
            let q = shaped::Counters {
                convs: &missing,
                lock,
            };
            last.extend(on_backend!(&mut *conn, c => q.load::<(String, i64)>(c))?);
        }
        // `next`: each conversation's first new seq; `new_last`: its counter after the batch.
        let mut next: HashMap<&str, i64> = HashMap::with_capacity(take.len());
        let mut new_last: Vec<i64> = Vec::with_capacity(take.len());
        for (conv, n) in &take {
            let Some(l) = last.get(*conv) else {
                return Err(diesel::result::Error::NotFound);
            };
            next.insert(conv, l + 1);
            new_last.push(l + n);
        }
        let q = shaped::SetCounters {
            convs: &conv_list,
            last: &new_last,
        };
        on_backend!(&mut *conn, c => q.execute(c))?;

        let mut rows: Vec<NewMessageRow> = Vec::with_capacity(batch.len());
        for (i, m) in batch.iter().enumerate() {
            if out[i].is_some() || same_as[i].is_some() {
                continue;
            }
            let Some(seq) = next.get_mut(keys[i].as_str()) else {
                continue;
            };
            rows.push(NewMessageRow {
                conv: &keys[i],
                seq: *seq,
                sender: m.sender.as_str(),
                body: &m.body,
                ts: m.ts,
                client_id: m.client_id.as_deref(),
            });
            out[i] = Some(Ok(Stored {
                conv: convs[i].clone(),
                seq: *seq,
                ts: m.ts,
                duplicate: false,
            }));
            *seq += 1;
        }
        let mut rest = &rows[..];
        while !rest.is_empty() {
            let (chunk, tail) = rest.split_at(shaped::insert_chunk(rest.len()));
            let q = shaped::InsertMessages { rows: chunk };
            on_backend!(&mut *conn, c => q.execute(c))?;
            rest = tail;
        }
    }

    Ok(out
        .iter()
        .enumerate()
        .map(|(i, r)| match (r, same_as[i]) {
            (Some(r), _) => r.clone(),
            (None, Some(j)) => match &out[j] {
                Some(Ok(s)) => Ok(Stored {
                    duplicate: true,
                    ..s.clone()
                }),
                Some(Err(e)) => Err(e.clone()),
                None => Err(ChatError::unavailable("internal: message not placed")),
            },
            (None, None) => Err(ChatError::unavailable("internal: message not placed")),
        })
        .collect())
}

/// Whether reading a counter must lock its row (MariaDB); SQLite's write
/// transaction holds the database's one write lock already.
fn locks_rows(conn: &DbConn) -> bool {
    match conn {
        #[cfg(feature = "mysql")]
        DbConn::Mysql(_) => true,
        #[cfg(feature = "sqlite")]
        DbConn::Sqlite(_) => false,
    }
}

/// The distinct items, sorted.
fn distinct<'a>(items: impl Iterator<Item = &'a str>) -> Vec<&'a str> {
    let mut v: Vec<&str> = items.collect();
    v.sort_unstable();
    v.dedup();
    v
}

/// The store path's statements, written so that diesel's prepared-statement
/// cache keeps them. diesel does not cache an `UPDATE`, an `eq_any` list or a
/// multi-row `INSERT` of a `Vec` (their SQL text varies), so each batch used
/// to be parsed afresh (SQLite) or prepared, run and closed in three round
/// trips per statement (MariaDB). These statements are keyed by their SQL
/// text instead, and come in few shapes: a list of `n` values is written with
/// `n` rounded up to a power of two (the last value repeated, which changes
/// nothing in `IN (…)` or `CASE`), and rows are inserted in chunks of a power
/// of two up to [`MAX_INSERT_ROWS`].
mod shaped {
    use diesel::backend::Backend;
    use diesel::query_builder::{AstPass, Query, QueryFragment, QueryId};
    use diesel::serialize::ToSql;
    use diesel::sql_types::{BigInt, HasSqlType, Nullable, Text};
    use diesel::{QueryResult, RunQueryDsl};

    use crate::db::models::NewMessageRow;

    /// The most rows one INSERT takes.
    pub const MAX_INSERT_ROWS: usize = 128;

    /// How many placeholders a list of `n` values is written with.
    pub fn shape(n: usize) -> usize {
        n.max(1).next_power_of_two()
    }

    /// How many of `n` remaining rows the next INSERT takes: a power of two.
    pub fn insert_chunk(n: usize) -> usize {
        if n >= MAX_INSERT_ROWS {
            MAX_INSERT_ROWS
        } else if n == 0 {
            0
        } else {
            1 << (usize::BITS - 1 - n.leading_zeros())
        }
    }

    fn empty() -> diesel::result::Error {
        diesel::result::Error::QueryBuilderError("empty value list".into())
    }

    /// `(?, ?, …)`: the values, padded to their shape with the last one.
    fn list<'b, DB>(out: &mut AstPass<'_, 'b, DB>, items: &'b [&'b str]) -> QueryResult<()>
    where
        DB: Backend + HasSqlType<Text>,
        str: ToSql<Text, DB>,
    {
        let last = items.last().ok_or_else(empty)?;
        out.push_sql("(");
        for i in 0..shape(items.len()) {
            if i > 0 {
                out.push_sql(", ");
            }
            out.push_bind_param::<Text, str>(*items.get(i).unwrap_or(last))?;
        }
        out.push_sql(")");
        Ok(())
    }

    /// Cached by SQL text; usable with `load`/`execute`.
    macro_rules! sql_keyed {
        ($($t:ident),*) => {$(
            impl QueryId for $t<'_> {
                type QueryId = ();
                const HAS_STATIC_QUERY_ID: bool = false;
            }
            impl<Conn> RunQueryDsl<Conn> for $t<'_> {}
        )*};
    }
    sql_keyed!(
        KnownSends,
        CurrentMembers,
        ExistingGroups,
        Counters,
        SetCounters,
        InsertMessages
    );

    /// Stored messages of these senders with these client ids:
    /// `(sender, client_id, conv, seq, ts)`.
    pub struct KnownSends<'a> {
        pub client_ids: &'a [&'a str],
        pub senders: &'a [&'a str],
    }

    impl Query for KnownSends<'_> {
        type SqlType = (Text, Nullable<Text>, Text, BigInt, BigInt);
    }

    impl<DB> QueryFragment<DB> for KnownSends<'_>
    where
        DB: Backend + HasSqlType<Text>,
        str: ToSql<Text, DB>,
    {
        fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, DB>) -> QueryResult<()> {
            out.push_sql(
                "SELECT sender, client_id, conv, seq, ts FROM messages WHERE client_id IN ",
            );
            list(&mut out, self.client_ids)?;
            out.push_sql(" AND sender IN ");
            list(&mut out, self.senders)
        }
    }

    /// Current members among these users of these conversations: `(conv, user_id)`.
    pub struct CurrentMembers<'a> {
        pub convs: &'a [&'a str],
        pub users: &'a [&'a str],
    }

    impl Query for CurrentMembers<'_> {
        type SqlType = (Text, Text);
    }

    impl<DB> QueryFragment<DB> for CurrentMembers<'_>
    where
        DB: Backend + HasSqlType<Text>,
        str: ToSql<Text, DB>,
    {
        fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, DB>) -> QueryResult<()> {
            out.push_sql("SELECT conv, user_id FROM members WHERE conv IN ");
            list(&mut out, self.convs)?;
            out.push_sql(" AND user_id IN ");
            list(&mut out, self.users)?;
            out.push_sql(" AND left_seq IS NULL");
            Ok(())
        }
    }

    /// Which of these group ids exist.
    pub struct ExistingGroups<'a> {
        pub ids: &'a [&'a str],
    }

    impl Query for ExistingGroups<'_> {
        type SqlType = Text;
    }

    impl<DB> QueryFragment<DB> for ExistingGroups<'_>
    where
        DB: Backend + HasSqlType<Text>,
        str: ToSql<Text, DB>,
    {
        fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, DB>) -> QueryResult<()> {
            out.push_sql("SELECT id FROM chat_groups WHERE id IN ");
            list(&mut out, self.ids)
        }
    }

    /// The seq counters of these conversations, `(conv, last_seq)`; with
    /// `lock`, their rows locked for the transaction (`FOR UPDATE`, MariaDB).
    pub struct Counters<'a> {
        pub convs: &'a [&'a str],
        pub lock: bool,
    }

    impl Query for Counters<'_> {
        type SqlType = (Text, BigInt);
    }

    impl<DB> QueryFragment<DB> for Counters<'_>
    where
        DB: Backend + HasSqlType<Text>,
        str: ToSql<Text, DB>,
    {
        fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, DB>) -> QueryResult<()> {
            out.push_sql("SELECT conv, last_seq FROM conversations WHERE conv IN ");
            list(&mut out, self.convs)?;
            if self.lock {
                out.push_sql(" ORDER BY conv FOR UPDATE");
            }
            Ok(())
        }
    }

    /// Set the counters of these conversations (`convs[i]` to `last[i]`) in one statement.
    pub struct SetCounters<'a> {
        pub convs: &'a [&'a str],
        pub last: &'a [i64],
    }

    impl<DB> QueryFragment<DB> for SetCounters<'_>
    where
        DB: Backend + HasSqlType<Text> + HasSqlType<BigInt>,
        str: ToSql<Text, DB>,
        i64: ToSql<BigInt, DB>,
    {
        fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, DB>) -> QueryResult<()> {
            if self.convs.len() != self.last.len() {
                return Err(diesel::result::Error::QueryBuilderError(
                    "one counter value per conversation".into(),
                ));
            }
            let (Some(k), Some(v)) = (self.convs.last(), self.last.last()) else {
                return Err(empty());
            };
            out.push_sql("UPDATE conversations SET last_seq = CASE conv");
            for i in 0..shape(self.convs.len()) {
                out.push_sql(" WHEN ");
                out.push_bind_param::<Text, str>(*self.convs.get(i).unwrap_or(k))?;
                out.push_sql(" THEN ");
                out.push_bind_param::<BigInt, i64>(self.last.get(i).unwrap_or(v))?;
            }
            out.push_sql(" ELSE last_seq END WHERE conv IN ");
            list(&mut out, self.convs)
        }
    }

    /// A page of a user's backlog after `(after_conv, after_seq)` for MariaDB:
    /// the same rows and order as the DSL query of [`super::backlog_page`],
    /// written as "the rest of this conversation" (an index range on
    /// `messages`' primary key, read in order and stopped at the limit)
    /// `UNION ALL` "later conversations", so that a page no longer re-reads
    /// and sorts every row of the conversation it continues.
    #[cfg(feature = "mysql")]
    pub struct Backlog<'a> {
        pub user: &'a str,
        pub after_conv: &'a str,
        pub after_seq: i64,
        pub limit: i64,
    }

    #[cfg(feature = "mysql")]
    impl QueryId for Backlog<'_> {
        type QueryId = ();
        const HAS_STATIC_QUERY_ID: bool = false;
    }
    #[cfg(feature = "mysql")]
    impl<Conn> RunQueryDsl<Conn> for Backlog<'_> {}

    #[cfg(feature = "mysql")]
    impl Query for Backlog<'_> {
        type SqlType = (Text, BigInt, Text, Text, BigInt, Nullable<Text>);
    }

    #[cfg(feature = "mysql")]
    impl QueryFragment<diesel::mysql::Mysql> for Backlog<'_> {
        fn walk_ast<'b>(
            &'b self,
            mut out: AstPass<'_, 'b, diesel::mysql::Mysql>,
        ) -> QueryResult<()> {
            fn visible<'b>(
                out: &mut AstPass<'_, 'b, diesel::mysql::Mysql>,
                user: &'b str,
            ) -> QueryResult<()> {
                out.push_sql(
                    "SELECT m.conv AS conv, m.seq AS seq, m.sender AS sender, m.body AS body, \
                     m.ts AS ts, m.client_id AS client_id \
                     FROM members b INNER JOIN messages m ON m.conv = b.conv \
                     AND m.seq > b.delivered_seq AND m.seq > b.joined_seq \
                     WHERE (b.left_seq IS NULL OR m.seq <= b.left_seq) \
                     AND (b.gap_from IS NULL OR m.seq <= b.gap_from OR m.seq > b.gap_to) \
                     AND b.user_id = ",
                );
                out.push_bind_param::<Text, str>(user)?;
                out.push_sql(" AND m.sender <> ");
                out.push_bind_param::<Text, str>(user)
            }
            out.push_sql("SELECT * FROM ((");
            visible(&mut out, self.user)?;
            out.push_sql(" AND b.conv = ");
            out.push_bind_param::<Text, str>(self.after_conv)?;
            out.push_sql(" AND m.conv = ");
            out.push_bind_param::<Text, str>(self.after_conv)?;
            out.push_sql(" AND m.seq > ");
            out.push_bind_param::<BigInt, i64>(&self.after_seq)?;
            out.push_sql(" ORDER BY m.seq LIMIT ");
            out.push_bind_param::<BigInt, i64>(&self.limit)?;
            out.push_sql(") UNION ALL (");
            visible(&mut out, self.user)?;
            out.push_sql(" AND b.conv > ");
            out.push_bind_param::<Text, str>(self.after_conv)?;
            out.push_sql(" ORDER BY m.conv, m.seq LIMIT ");
            out.push_bind_param::<BigInt, i64>(&self.limit)?;
            out.push_sql(")) AS page ORDER BY conv, seq LIMIT ");
            out.push_bind_param::<BigInt, i64>(&self.limit)
        }
    }

    /// One multi-row INSERT of exactly these rows (the caller chunks them
    /// with [`insert_chunk`]).
    pub struct InsertMessages<'a> {
        pub rows: &'a [NewMessageRow<'a>],
    }

    impl<DB> QueryFragment<DB> for InsertMessages<'_>
    where
        DB: Backend + HasSqlType<Text> + HasSqlType<BigInt>,
        str: ToSql<Text, DB>,
        i64: ToSql<BigInt, DB>,
    {
        fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, DB>) -> QueryResult<()> {
            if self.rows.is_empty() {
                return Err(empty());
            }
            out.push_sql("INSERT INTO messages (conv, seq, sender, body, ts, client_id) VALUES ");
            for (i, r) in self.rows.iter().enumerate() {
                out.push_sql(if i == 0 { "(" } else { ", (" });
                out.push_bind_param::<Text, str>(r.conv)?;
                out.push_sql(", ");
                out.push_bind_param::<BigInt, i64>(&r.seq)?;
                out.push_sql(", ");
                out.push_bind_param::<Text, str>(r.sender)?;
                out.push_sql(", ");
                out.push_bind_param::<Text, str>(r.body)?;
                out.push_sql(", ");
                out.push_bind_param::<BigInt, i64>(&r.ts)?;
                out.push_sql(", ");
                out.push_bind_param::<Nullable<Text>, Option<&str>>(&r.client_id)?;
                out.push_sql(")");
            }
            Ok(())
        }
    }
}

/// Create direct conversations (counter at 0) with their parties as members;
/// insert-or-ignore, so a concurrent creator is no error.
fn create_direct(conn: &mut DbConn, keys: &[&str], now: i64) -> QueryResult<()> {
    let convs: Vec<NewConversation> = keys
        .iter()
        .map(|k| NewConversation {
            conv: k,
            last_seq: 0,
            created_at: now,
        })
        .collect();
    let parties: Vec<(&str, UserId)> = keys
        .iter()
        .filter_map(|k| match ConvKey::parse(k) {
            Ok(ConvKey::Direct(a, b)) if a == b => Some(vec![(*k, a)]),
            Ok(ConvKey::Direct(a, b)) => Some(vec![(*k, a), (*k, b)]),
            _ => None,
        })
        .flatten()
        .collect();
    let members_rows: Vec<NewMember> = parties
        .iter()
        .map(|(conv, u)| NewMember {
            conv,
            user_id: u.as_str(),
            joined_seq: 0,
            left_seq: None,
            delivered_seq: 0,
            gap_from: None,
            gap_to: None,
            joined_at: now,
        })
        .collect();
    on_backend!(&mut *conn, c => diesel::insert_or_ignore_into(conversations::table).values(&convs).execute(c))?;
    on_backend!(&mut *conn, c => diesel::insert_or_ignore_into(members::table).values(&members_rows).execute(c))?;
    Ok(())
}

/// A page of a conversation's history visible to `user`, newest first, and
/// whether older visible messages remain.
pub fn history(
    conn: &mut DbConn,
    user: &UserId,
    conv: &ConvKey,
    before_seq: Option<i64>,
    limit: i64,
) -> Result<(Vec<MessageRow>, bool), ChatError> {
    let key = conv.to_string();
    let floor = match conv {
        ConvKey::Direct(..) if conv.names(user) => 0,
        ConvKey::Direct(..) => return Err(ChatError::forbidden("not your conversation")),
        ConvKey::Group(g) => group_member_floor(conn, g, user)?,
    };
    let mut rows: Vec<MessageRow> = messages::table
        .filter(messages::conv.eq(&key))
        .filter(messages::seq.gt(floor))
        .filter(messages::seq.lt(before_seq.unwrap_or(i64::MAX)))
        .order(messages::seq.desc())
        .limit(limit + 1)
        .select(MessageRow::as_select())
        .load(conn)?;
    let more = rows.len() as i64 > limit;
    rows.truncate(limit as usize);
    Ok((rows, more))
}

/// The join seq of a current member; `not_found` / `forbidden` otherwise.
fn group_member_floor(conn: &mut DbConn, g: &GroupId, user: &UserId) -> Result<i64, ChatError> {
    let exists: bool = diesel::select(diesel::dsl::exists(chat_groups::table.find(g.as_str())))
        .get_result(conn)?;
    if !exists {
        return Err(ChatError::not_found(format!("no group {g}")));
    }
    let m = membership(conn, &ConvKey::Group(g.clone()), user)?;
    match m {
        Some(m) if m.left_seq.is_none() => Ok(m.current_join()),
        _ => Err(ChatError::forbidden(format!("not a member of group {g}"))),
    }
}

/// A user's membership of a conversation, if they ever were in it.
pub fn membership(
    conn: &mut DbConn,
    conv: &ConvKey,
    user: &UserId,
) -> QueryResult<Option<Membership>> {
    members::table
        .find((conv.to_string(), user.as_str()))
        .select(Membership::as_select())
        .first(conn)
        .optional()
}

/// One page of the messages stored for `user` and not yet acknowledged, in
/// (conversation, seq) order, after the position `after` (exclusive). The
/// user's own messages count as delivered and are left out.
pub fn backlog_page(
    conn: &mut DbConn,
    user: &UserId,
    after: Option<(&str, i64)>,
    limit: i64,
) -> QueryResult<Vec<MessageRow>> {
    let (after_conv, after_seq) = after.unwrap_or(("", 0));
    // MariaDB cannot use the keyset's `OR` as an index range: it would read
    // and sort the whole backlog for every page. Its own query splits it.
    #[cfg(feature = "mysql")]
    if let DbConn::Mysql(c) = conn {
        let q = shaped::Backlog {
            user: user.as_str(),
            after_conv,
            after_seq,
            limit,
        };
        return q.load::<MessageRow>(c);
    }
    members::table
        .inner_join(
            messages::table.on(messages::conv
                .eq(members::conv)
                .and(messages::seq.gt(members::delivered_seq))
                .and(messages::seq.gt(members::joined_seq))),
        )
        .filter(members::user_id.eq(user.as_str()))
        .filter(
            members::left_seq
                .is_null()
                .or(messages::seq.le(members::left_seq.assume_not_null())),
        )
        .filter(
            members::gap_from
                .is_null()
                .or(messages::seq.le(members::gap_from.assume_not_null()))
                .or(messages::seq.gt(members::gap_to.assume_not_null())),
        )
        .filter(messages::sender.ne(user.as_str()))
        .filter(
            messages::conv.gt(after_conv).or(messages::conv
                .eq(after_conv)
                .and(messages::seq.gt(after_seq))),
        )
        .order((messages::conv.asc(), messages::seq.asc()))
        .limit(limit)
        .select(MessageRow::as_select())
        .load(conn)
}

/// Record that `user` has every message of `conv` up to `seq`. Never moves the
/// position backwards; beyond the last seq the user may see, or in a
/// conversation the user never was in, is `bad_request`.
pub fn ack(conn: &mut DbConn, user: &UserId, conv: &ConvKey, seq: i64) -> Result<(), ChatError> {
    let item = [(user.clone(), conv.clone(), seq)];
    ack_batch(conn, &item)?.pop().unwrap_or(Ok(()))
}

/// Apply many acks in one transaction (one commit): two reads for the whole
/// batch, one update per position that moves. One result per ack, in order.
pub fn ack_batch(
    conn: &mut DbConn,
    acks: &[(UserId, ConvKey, i64)],
) -> Result<Vec<Result<(), ChatError>>, ChatError> {
    let keys: Vec<String> = acks.iter().map(|(_, c, _)| c.to_string()).collect();
    let users: Vec<&str> = acks.iter().map(|(u, _, _)| u.as_str()).collect();
    retrying(conn, "ack batch", |c| {
        let rows: Vec<(String, String, Option<i64>, i64)> = members::table
            .filter(members::conv.eq_any(&keys))
            .filter(members::user_id.eq_any(&users))
            .select((
                members::conv,
                members::user_id,
                members::left_seq,
                members::delivered_seq,
            ))
            .load(c)?;
        let mut state: HashMap<(String, String), (Option<i64>, i64)> = rows
            .into_iter()
            .map(|(k, u, l, d)| ((k, u), (l, d)))
            .collect();
        let last: HashMap<String, i64> = conversations::table
            .filter(conversations::conv.eq_any(&keys))
            .select((conversations::conv, conversations::last_seq))
            .load::<(String, i64)>(c)?
            .into_iter()
            .collect();
        let mut out = Vec::with_capacity(acks.len());
        for ((user, _, seq), key) in acks.iter().zip(&keys) {
            let Some((left, delivered)) = state.get_mut(&(key.clone(), user.to_string())) else {
                out.push(Err(ChatError::bad_request(format!("you are not in {key}"))));
                continue;
            };
            let limit = left.or_else(|| last.get(key).copied()).unwrap_or(0);
            if *seq > limit {
                out.push(Err(ChatError::bad_request(format!(
                    "ack beyond the last seq ({limit}) of {key}"
                ))));
                continue;
            }
            if *seq > *delivered {
                diesel::update(members::table.find((key, user.as_str())))
                    .filter(members::delivered_seq.lt(*seq))
                    .set(members::delivered_seq.eq(*seq))
                    .execute(c)?;
                *delivered = *seq;
            }
            out.push(Ok(()));
        }
        Ok(out)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows() -> Vec<NewMessageRow<'static>> {
        (1..=3)
            .map(|seq| NewMessageRow {
                conv: "dm:a:b",
                seq,
                sender: "a",
                body: "x",
                ts: 1,
                client_id: None,
            })
            .collect()
    }

    /// The placeholders of a statement's SQL text (without the binds' listing).
    fn placeholders(sql: &str) -> usize {
        sql.split(" -- binds:")
            .next()
            .unwrap_or("")
            .matches('?')
            .count()
    }

    /// A chunk of rows is one multi-row INSERT on each backend, not one per
    /// row; lists come padded to a power of two; counters are locked on
    /// MariaDB only.
    #[cfg(feature = "sqlite")]
    #[test]
    fn sqlite_store_statements() {
        use diesel::sqlite::Sqlite;
        let rows = rows();
        let q = shaped::InsertMessages { rows: &rows };
        let sql = diesel::debug_query::<Sqlite, _>(&q).to_string();
        assert_eq!(sql.matches("INSERT").count(), 1, "{sql}");
        assert_eq!(sql.matches("), (").count(), 2, "{sql}");
        assert_eq!(placeholders(&sql), 18, "{sql}");
        let convs = ["dm:a:b", "dm:a:c", "dm:b:c"];
        let q = shaped::Counters {
            convs: &convs,
            lock: false,
        };
        let sql = diesel::debug_query::<Sqlite, _>(&q).to_string();
        assert_eq!(placeholders(&sql), 4, "{sql}");
        assert!(!sql.contains("FOR UPDATE"), "{sql}");
        let q = shaped::SetCounters {
            convs: &convs,
            last: &[1, 2, 3],
        };
        let sql = diesel::debug_query::<Sqlite, _>(&q).to_string();
        assert_eq!(placeholders(&sql), 4 * 2 + 4, "{sql}");
    }

    #[cfg(feature = "mysql")]
    #[test]
    fn mysql_store_statements() {
        use diesel::mysql::Mysql;
        let rows = rows();
        let q = shaped::InsertMessages { rows: &rows };
        let sql = diesel::debug_query::<Mysql, _>(&q).to_string();
        assert_eq!(sql.matches("INSERT").count(), 1, "{sql}");
        assert_eq!(sql.matches("), (").count(), 2, "{sql}");
        let convs = ["dm:a:b", "dm:a:c", "dm:b:c", "dm:b:d", "dm:c:d"];
        let q = shaped::Counters {
            convs: &convs,
            lock: true,
        };
        let sql = diesel::debug_query::<Mysql, _>(&q).to_string();
        assert_eq!(placeholders(&sql), 8, "{sql}");
        assert!(sql.contains("ORDER BY conv FOR UPDATE"), "{sql}");
        let q = shaped::KnownSends {
            client_ids: &["c-1", "c-2"],
            senders: &["a"],
        };
        let sql = diesel::debug_query::<Mysql, _>(&q).to_string();
        assert_eq!(placeholders(&sql), 3, "{sql}");
    }

    /// Inserts are chunked into powers of two up to 128 rows, covering every row once.
    #[test]
    fn insert_chunks_have_few_sizes() {
        let mut sizes = HashSet::new();
        for n in 1..=1100 {
            let (mut left, mut statements) = (n, 0);
            while left > 0 {
                let c = shaped::insert_chunk(left);
                assert!(c >= 1 && c <= left && c.is_power_of_two(), "{n}: {c}");
                assert!(c <= shaped::MAX_INSERT_ROWS);
                sizes.insert(c);
                left -= c;
                statements += 1;
            }
            assert!(statements <= n / shaped::MAX_INSERT_ROWS + 7, "{n}");
        }
        assert_eq!(sizes.len(), 8);
        assert_eq!(shaped::insert_chunk(0), 0);
        assert_eq!(shaped::shape(0), 1);
        assert_eq!(shaped::shape(5), 8);
        assert_eq!(shaped::shape(512), 512);
    }

    /// A batch larger than one INSERT and with more conversations than one
    /// list shape: seqs stay contiguous per conversation across chunks and
    /// batches, repeated client ids get their first copy's place.
    #[cfg(feature = "sqlite")]
    #[test]
    fn big_batches_keep_seqs_contiguous() {
        use crate::config::DatabaseUrl;
        let dir = tempfile::tempdir().expect("temp dir");
        let url = DatabaseUrl::Sqlite(dir.path().join("t.db"));
        let mut conn =
            crate::db::conn::establish(&url, std::time::Duration::from_secs(5)).expect("open");
        crate::db::conn::run_migrations(&mut conn).expect("migrate");
        let user = |s: String| UserId::parse(&s).expect("id");
        let msg = |p: usize, n: usize| NewMessage {
            sender: user(format!("s{p}")),
            to: Target::User(user(format!("r{p}"))),
            body: format!("{n}"),
            client_id: Some(format!("c{n}")),
            ts: 1,
        };
        let mut seen: HashMap<String, i64> = HashMap::new();
        for round in 0..2 {
            // 300 messages over 9 conversations, then the first 5 again.
            let mut batch: Vec<NewMessage> =
                (0..300).map(|n| msg(n % 9, round * 1000 + n)).collect();
            batch.extend((0..5).map(|n| msg(n % 9, round * 1000 + n)));
            let out = store_batch(&mut conn, &batch).expect("store");
            assert_eq!(out.len(), batch.len());
            for (i, r) in out.iter().enumerate() {
                let s = r.as_ref().expect("stored");
                let conv = s.conv.to_string();
                if i < 300 {
                    assert!(!s.duplicate);
                    let prev = seen.insert(conv.clone(), s.seq).unwrap_or(0);
                    assert_eq!(s.seq, prev + 1, "{conv}");
                } else {
                    assert!(s.duplicate);
                    assert_eq!(
                        Ok(s),
                        out[i - 300]
                            .as_ref()
                            .map(|f| Stored {
                                duplicate: true,
                                ..f.clone()
                            })
                            .as_ref()
                    );
                }
            }
            // The same batch again: everything is a duplicate, nothing new.
            let again = store_batch(&mut conn, &batch).expect("store again");
            assert!(again.iter().all(|r| matches!(r, Ok(s) if s.duplicate)));
        }
        let last: Vec<i64> = conversations::table
            .select(conversations::last_seq)
            .load(&mut conn)
            .expect("counters");
        assert_eq!(last.len(), 9);
        assert_eq!(last.iter().sum::<i64>(), 600);
        let rows: i64 = messages::table
            .count()
            .get_result(&mut conn)
            .expect("count");
        assert_eq!(rows, 600);
    }

    /// CPU cost of `store_batch` (not a correctness test; run by hand):
    /// 50 direct pairs, batches of the sizes a write lane forms under load.
    /// `cargo test --release --lib store_batch_cost -- --ignored --nocapture`;
    /// MariaDB too when `CHAT_HUB_BENCH_MYSQL_URL` names a fresh database.
    /// Prints wall time and this thread's CPU time per stored message (the
    /// SQLite library runs on this thread; MariaDB's own CPU is not included).
    #[cfg(feature = "sqlite")]
    #[test]
    #[ignore]
    fn store_batch_cost() {
        use crate::config::DatabaseUrl;
        use std::time::{Duration, Instant};
        fn thread_cpu_ns() -> u64 {
            std::fs::read_to_string("/proc/thread-self/schedstat")
                .ok()
                .and_then(|s| s.split_whitespace().next()?.parse().ok())
                .unwrap_or(0)
        }
        let dir = tempfile::tempdir().expect("temp dir");
        let mut urls = vec![DatabaseUrl::Sqlite(dir.path().join("bench.db"))];
        if let Ok(u) = std::env::var("CHAT_HUB_BENCH_MYSQL_URL") {
            urls.extend(DatabaseUrl::parse(&u).ok());
        }
        for url in urls {
            let mut conn = crate::db::conn::establish(&url, Duration::from_secs(5)).expect("open");
            crate::db::conn::run_migrations(&mut conn).expect("migrate");
            let sizes = [1usize, 2, 3, 5, 8, 13, 21, 34, 50, 120];
            let mut n = 0u64;
            let mut batches = 0u64;
            let (t0, c0) = (Instant::now(), thread_cpu_ns());
            for round in 0..40 {
                for &size in &sizes {
                    let batch: Vec<NewMessage> = (0..size)
                        .map(|i| {
                            let p = (round * 7 + i) % 50;
                            n += 1;
                            NewMessage {
                                sender: UserId::parse(&format!("bench-s{p}")).expect("id"),
                                to: Target::User(
                                    UserId::parse(&format!("bench-r{p}")).expect("id"),
                                ),
                                body: format!("{{\"t\":1764100000000000,\"i\":{n}}}"),
                                client_id: Some(format!("c-{p}-{n:010}")),
                                ts: 1_764_100_000_000,
                            }
                        })
                        .collect();
                    let out = store_batch(&mut conn, &batch).expect("store");
                    assert!(out.iter().all(|r| matches!(r, Ok(s) if !s.duplicate)));
                    batches += 1;
                }
            }
            let (wall, cpu) = (t0.elapsed(), thread_cpu_ns() - c0);
            println!(
                "store_batch_cost {}: {n} messages in {batches} batches: wall {:.1} us/msg, thread CPU {:.1} us/msg",
                match url { DatabaseUrl::Mysql(_) => "mysql", DatabaseUrl::Sqlite(_) => "sqlite" },
                wall.as_secs_f64() * 1e6 / n as f64,
                cpu as f64 / 1e3 / n as f64
            );
        }
    }
}
