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

/// Store a batch of messages in one transaction: one multi-row INSERT, each
/// conversation's seqs allocated by bumping its `last_seq` under the row lock.
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

    // Idempotency: earlier sends with the same (sender, client_id), stored or earlier in this batch.
    let client_ids: Vec<&str> = batch
        .iter()
        .filter_map(|m| m.client_id.as_deref())
        .collect();
    // Both columns of the unique index, so the lookup reads only candidates.
    let senders: Vec<&str> = batch
        .iter()
        .filter(|m| m.client_id.is_some())
        .map(|m| m.sender.as_str())
        .collect();
    let mut known: HashMap<(String, String), Stored> = HashMap::new();
    if !client_ids.is_empty() {
        let rows: Vec<(String, Option<String>, String, i64, i64)> = messages::table
            .filter(messages::client_id.eq_any(&client_ids))
            .filter(messages::sender.eq_any(&senders))
            .select((
                messages::sender,
                messages::client_id,
                messages::conv,
                messages::seq,
                messages::ts,
            ))
            .load(conn)?;
        for (sender, cid, conv, seq, ts) in rows {
            if let (Some(cid), Ok(conv)) = (cid, ConvKey::parse(&conv)) {
                known.insert(
                    (sender, cid),
                    Stored {
                        conv,
                        seq,
                        ts,
                        duplicate: true,
                    },
                );
            }
        }
    }

    // Group sends: the sender must be a current member of an existing group.
    let group_convs: Vec<&str> = keys
        .iter()
        .zip(batch)
        .filter(|(_, m)| matches!(m.to, Target::Group(_)))
        .map(|(k, _)| k.as_str())
        .collect();
    let mut allowed: HashSet<(String, String)> = HashSet::new();
    let mut existing_groups: HashSet<String> = HashSet::new();
    if !group_convs.is_empty() {
        let senders: Vec<&str> = batch.iter().map(|m| m.sender.as_str()).collect();
        allowed = members::table
            .filter(members::conv.eq_any(&group_convs))
            .filter(members::user_id.eq_any(&senders))
            .filter(members::left_seq.is_null())
            .select((members::conv, members::user_id))
            .load::<(String, String)>(conn)?
            .into_iter()
            .collect();
        let ids: Vec<&str> = group_convs
            .iter()
            .filter_map(|k| k.strip_prefix("group:"))
            .collect();
        existing_groups = chat_groups::table
            .filter(chat_groups::id.eq_any(&ids))
            .select(chat_groups::id)
            .load::<String>(conn)?
            .into_iter()
            .collect();
    }

    // Decide each message; count what each conversation will take.
    let mut take: BTreeMap<&str, i64> = BTreeMap::new();
    let mut same_as: Vec<Option<usize>> = vec![None; batch.len()];
    let mut first_of: HashMap<(&str, &str), usize> = HashMap::new();
    for (i, m) in batch.iter().enumerate() {
        if let Some(cid) = m.client_id.as_deref() {
            if let Some(s) = known.get(&(m.sender.to_string(), cid.to_string())) {
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
            if !allowed.contains(&(keys[i].clone(), m.sender.to_string())) {
                out[i] = Some(Err(ChatError::forbidden(format!(
                    "not a member of group {g}"
                ))));
                continue;
            }
        }
        *take.entry(keys[i].as_str()).or_default() += 1;
    }

    if !take.is_empty() {
        // Allocate: bump each conversation's counter (in key order, so that
        // concurrent transactions lock rows in one order), then read it back.
        // A direct conversation that has no row yet comes into being here,
        // with both parties as members, and is bumped again.
        let mut missing: Vec<&str> = Vec::new();
        for (conv, n) in &take {
            let bumped = diesel::update(conversations::table.find(*conv))
                .set(conversations::last_seq.eq(conversations::last_seq + *n))
                .execute(conn)?;
            if bumped == 0 && conv.starts_with("dm:") {
                missing.push(conv);
            }
        }
        if !missing.is_empty() {
            create_direct(conn, &missing, now)?;
            for conv in &missing {
                diesel::update(conversations::table.find(*conv))
                    .set(conversations::last_seq.eq(conversations::last_seq + take[conv]))
                    .execute(conn)?;
            }
        }
        let conv_list: Vec<&str> = take.keys().copied().collect();
        let last: HashMap<String, i64> = conversations::table
            .filter(conversations::conv.eq_any(&conv_list))
            .select((conversations::conv, conversations::last_seq))
            .load::<(String, i64)>(conn)?
            .into_iter()
            .collect();
        let mut next: HashMap<&str, i64> = HashMap::new();
        for (conv, n) in &take {
            let Some(l) = last.get(*conv) else {
                return Err(diesel::result::Error::NotFound);
            };
            next.insert(conv, l - n + 1);
        }
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
        on_backend!(&mut *conn, c => diesel::insert_into(messages::table).values(&rows).execute(c))?;
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

    /// A batch is one multi-row INSERT on each backend, not one per row.
    #[cfg(feature = "sqlite")]
    #[test]
    fn sqlite_batch_insert_is_one_statement() {
        let rows = rows();
        let q = diesel::insert_into(messages::table).values(&rows);
        let sql = diesel::debug_query::<diesel::sqlite::Sqlite, _>(&q).to_string();
        assert_eq!(sql.matches("INSERT").count(), 1, "{sql}");
        assert_eq!(sql.matches("), (").count(), 2, "{sql}");
    }

    #[cfg(feature = "mysql")]
    #[test]
    fn mysql_batch_insert_is_one_statement() {
        let rows = rows();
        let q = diesel::insert_into(messages::table).values(&rows);
        let sql = diesel::debug_query::<diesel::mysql::Mysql, _>(&q).to_string();
        assert_eq!(sql.matches("INSERT").count(), 1, "{sql}");
        assert_eq!(sql.matches("), (").count(), 2, "{sql}");
    }
}
