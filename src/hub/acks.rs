//! Acknowledgements, coalesced: acks from every session wait here while one
//! batch is being written; the next batch keeps only the highest seq per
//! (user, conversation) and goes in one transaction. Thousands of acks a
//! second thus cost a few commits, not one each.

use std::collections::HashMap;

use actix::prelude::*;

use super::server::{ChatServer, Reply, SessionId};
use crate::db::executor::AckBatch;
use crate::error::ChatError;
use crate::ids::{ConvKey, UserId};
use crate::metrics::METRICS;

/// Acks waiting beyond which new ones are refused `unavailable` (the
/// database is not keeping up); each distinct (user, conversation) is one.
const MAX_PENDING: usize = 100_000;

/// An `ack` frame (a session).
#[derive(Message)]
#[rtype(result = "()")]
pub struct AckRequest {
    pub session: SessionId,
    pub user: UserId,
    pub conv: ConvKey,
    pub seq: i64,
    pub r#ref: Option<String>,
}

/// The highest seq asked for a (user, conversation), and who asked it (for an error).
type Asked = (i64, SessionId, Option<String>);

#[derive(Default)]
pub struct Acks {
    pending: HashMap<(UserId, ConvKey), Asked>,
    busy: bool,
}

impl Acks {
    pub fn idle(&self) -> bool {
        !self.busy && self.pending.is_empty()
    }
}

impl Handler<AckRequest> for ChatServer {
    type Result = ();

    fn handle(&mut self, msg: AckRequest, ctx: &mut Context<Self>) {
        METRICS.server_mailbox.dec();
        let key = (msg.user, msg.conv);
        if self.acks.pending.len() >= MAX_PENDING && !self.acks.pending.contains_key(&key) {
            let reply: Reply<()> = Reply::Session {
                id: msg.session,
                r#ref: msg.r#ref,
            };
            return self.reply_error(
                reply,
                ChatError::unavailable("too many acks waiting; retry later"),
            );
        }
        // A later, higher ack of the same conversation subsumes an earlier one.
        let entry = self
            .acks
            .pending
            .entry(key)
            .or_insert((msg.seq, msg.session, None));
        if msg.seq >= entry.0 {
            *entry = (msg.seq, msg.session, msg.r#ref);
        }
        self.kick_acks(ctx);
    }
}

impl ChatServer {
    fn kick_acks(&mut self, ctx: &mut Context<Self>) {
        if self.acks.busy || self.acks.pending.is_empty() {
            return;
        }
        self.acks.busy = true;
        let batch: Vec<((UserId, ConvKey), Asked)> = self.acks.pending.drain().collect();
        let items = batch
            .iter()
            .map(|((u, c), (seq, _, _))| (u.clone(), c.clone(), *seq))
            .collect();
        self.db
            .send(AckBatch(items))
            .into_actor(self)
            .map(move |res, act, ctx| {
                let results = match res {
                    Ok(Ok(r)) if r.len() == batch.len() => r,
                    Ok(Ok(_)) => vec![
                        Err(ChatError::unavailable("internal: ack result mismatch"));
                        batch.len()
                    ],
                    Ok(Err(e)) => vec![Err(e); batch.len()],
                    Err(e) => vec![
                        Err(ChatError::unavailable(format!("database executor: {e}")));
                        batch.len()
                    ],
                };
                for ((_, (_, session, r#ref)), r) in batch.into_iter().zip(results) {
                    if let Err(e) = r {
                        act.reply_error(Reply::<()>::Session { id: session, r#ref }, e);
                    }
                }
                act.acks.busy = false;
                act.kick_acks(ctx);
                act.check_drained();
            })
            .spawn(ctx);
    }
}
