//! Acknowledgements, coalesced: acks from every session wait here while one
//! batch is being written; the next batch keeps only the highest seq per
//! (user, conversation) and goes in one transaction. Thousands of acks a
//! second thus cost a few commits, not one each.

use std::collections::HashMap;

use actix::prelude::*;

use super::server::{ChatServer, Reply, SessionEvent, SessionId};
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

/// One ack asked: its seq, and who asked it (for the answer).
type Asked = (i64, SessionId, Option<String>);

/// Acks kept per (user, conversation) while a batch is being written; past
/// it, the lowest are dropped (a higher ack covers them, unless it is refused).
const MAX_PER_CONVERSATION: usize = 16;

#[derive(Default)]
pub struct Acks {
    pending: HashMap<(UserId, ConvKey), Vec<Asked>>,
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
        // Every ack is judged on its own (a refused one must not cancel a valid
        // one before it), but they share one transaction.
        let asked = self.acks.pending.entry(key).or_default();
        if asked.len() >= MAX_PER_CONVERSATION {
            if let Some((i, _)) = asked.iter().enumerate().min_by_key(|(_, a)| a.0) {
                asked.remove(i);
            }
        }
        asked.push((msg.seq, msg.session, msg.r#ref));
        self.kick_acks(ctx);
    }
}

impl ChatServer {
    fn kick_acks(&mut self, ctx: &mut Context<Self>) {
        if self.acks.busy || self.acks.pending.is_empty() {
            return;
        }
        self.acks.busy = true;
        let mut batch: Vec<((UserId, ConvKey), Asked)> = self
            .acks
            .pending
            .drain()
            .flat_map(|(key, asked)| asked.into_iter().map(move |a| (key.clone(), a)))
            .collect();
        // One lock order for every batch: by conversation, then user.
        batch.sort_by(|((u1, c1), _), ((u2, c2), _)| (c1, u1).cmp(&(c2, u2)));
        let items = batch
            .iter()
            .map(|((u, c), (seq, _, _))| (u.clone(), c.clone(), *seq))
            .collect();
        self.db
            .send(AckBatch(items))
            .into_actor(self)
            .map(move |res, act, ctx| {
                let results = super::lanes::per_item(res, batch.len());
                for ((_, (_, session, r#ref)), r) in batch.into_iter().zip(results) {
                    match r {
                        Ok(()) => act.push(session, SessionEvent::AckAccepted),
                        Err(e) => act.reply_error(Reply::<()>::Session { id: session, r#ref }, e),
                    }
                }
                act.acks.busy = false;
                act.kick_acks(ctx);
                act.check_drained();
            })
            .spawn(ctx);
    }
}
