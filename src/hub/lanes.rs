//! The ChatServer's write lanes. Every conversation maps to one lane; a lane
//! has at most one database transaction in flight, so a conversation's
//! messages and group changes commit, and fan out, in the order they were
//! accepted. Sends that queue up while a lane is busy go together in the next
//! transaction (one multi-row INSERT): throughput grows with load, and a lone
//! message is written at once, with no waiting for company.

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeSet, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use actix::prelude::*;

use super::server::{ChangeGroup, ChatServer, ClientSend, Reply, SessionEvent, SessionId};
use crate::db::executor::{self as dbx, GroupOp};
use crate::db::models::{NewMessage, Stored};
use crate::error::{ChatError, ErrorCode};
use crate::ids::{ConvKey, GroupId, Target, UserId};
use crate::metrics::METRICS;
use crate::protocol::{GroupEvent, GroupView, MessageView, ServerFrame};

struct PendingSend {
    msg: NewMessage,
    reply: Reply<Stored>,
}

struct PendingGroup {
    by: Option<UserId>,
    op: GroupOp,
    reply: Reply<GroupView>,
}

enum Pending {
    Send(PendingSend),
    Group(PendingGroup),
}

#[derive(Default)]
struct Lane {
    busy: bool,
    queue: VecDeque<Pending>,
}

pub struct Lanes {
    lanes: Vec<Lane>,
}

impl Lanes {
    pub fn new(n: usize) -> Self {
        Lanes {
            lanes: (0..n.max(1)).map(|_| Lane::default()).collect(),
        }
    }

    fn lane_of(&self, conv: &str) -> usize {
        let mut h = DefaultHasher::new();
        conv.hash(&mut h);
        (h.finish() % self.lanes.len() as u64) as usize
    }

    /// No transaction in flight and nothing queued.
    pub fn idle(&self) -> bool {
        self.lanes.iter().all(|l| !l.busy && l.queue.is_empty())
    }

    pub fn queued(&self) -> usize {
        self.lanes.iter().map(|l| l.queue.len()).sum()
    }
}

/// One result per item of a batch from the DbExecutor's answer: a failed
/// batch (database down, executor gone) fails every item alike.
pub(super) fn per_item<T: Clone>(
    res: Result<Result<Vec<Result<T, ChatError>>, ChatError>, MailboxError>,
    n: usize,
) -> Vec<Result<T, ChatError>> {
    match res {
        Ok(Ok(r)) if r.len() == n => r,
        Ok(Ok(_)) => vec![Err(ChatError::unavailable("internal: batch result mismatch")); n],
        Ok(Err(e)) => vec![Err(e); n],
        Err(e) => vec![Err(ChatError::unavailable(format!("database executor: {e}"))); n],
    }
}

fn group_of(op: &GroupOp) -> &GroupId {
    match op {
        GroupOp::Create { group, .. }
        | GroupOp::Add { group, .. }
        | GroupOp::Remove { group, .. }
        | GroupOp::Leave { group } => group,
    }
}

impl Handler<ClientSend> for ChatServer {
    type Result = ();

    fn handle(&mut self, msg: ClientSend, ctx: &mut Context<Self>) {
        METRICS.server_mailbox.dec();
        let ClientSend {
            sender,
            to,
            body,
            client_id,
            reply,
        } = msg;
        if let Target::Group(g) = &to {
            if let Err(e) = self.check_group_member(g, &sender) {
                return self.reply_error(reply, e);
            }
        }
        // The server API acts with the backend's authority: only users are rate limited.
        let limited = matches!(reply, Reply::Session { .. });
        if limited && !self.take_rate(&sender) {
            self.stats.rate_limited += 1;
            METRICS.rate_limited.inc();
            let e = ChatError::new(
                ErrorCode::RateLimited,
                "over the send rate; nothing stored, slow down",
            );
            return self.reply_error(reply, e);
        }
        let conv = ConvKey::for_target(&sender, &to).to_string();
        let lane = self.lanes.lane_of(&conv);
        if self.lanes.lanes[lane].queue.len() >= self.cfg.max_lane_queue {
            if limited {
                self.refund_rate(&sender);
            }
            return self.reply_error(
                reply,
                ChatError::unavailable("too many messages waiting for the database; retry later"),
            );
        }
        let msg = NewMessage {
            sender,
            to,
            body,
            client_id,
            ts: crate::now_ms(),
        };
        self.lanes.lanes[lane]
            .queue
            .push_back(Pending::Send(PendingSend { msg, reply }));
        self.kick(lane, ctx);
    }
}

impl Handler<ChangeGroup> for ChatServer {
    type Result = ();

    fn handle(&mut self, msg: ChangeGroup, ctx: &mut Context<Self>) {
        METRICS.server_mailbox.dec();
        let lane = self
            .lanes
            .lane_of(&ConvKey::Group(group_of(&msg.op).clone()).to_string());
        if self.lanes.lanes[lane].queue.len() >= self.cfg.max_lane_queue {
            return self.reply_error(
                msg.reply,
                ChatError::unavailable("too many changes waiting for the database; retry later"),
            );
        }
        self.lanes.lanes[lane]
            .queue
            .push_back(Pending::Group(PendingGroup {
                by: msg.by,
                op: msg.op,
                reply: msg.reply,
            }));
        self.kick(lane, ctx);
    }
}

impl ChatServer {
    /// Start the lane's next transaction if it has none in flight.
    fn kick(&mut self, lane: usize, ctx: &mut Context<Self>) {
        METRICS.queued_writes.set(self.lanes.queued() as i64);
        let max_batch = self.cfg.max_batch;
        let l = &mut self.lanes.lanes[lane];
        if l.busy {
            return;
        }
        match l.queue.pop_front() {
            None => {}
            Some(Pending::Group(p)) => {
                l.busy = true;
                self.run_group(lane, p, ctx);
            }
            Some(Pending::Send(first)) => {
                l.busy = true;
                let mut batch = vec![first];
                while batch.len() < max_batch && matches!(l.queue.front(), Some(Pending::Send(_))) {
                    if let Some(Pending::Send(p)) = l.queue.pop_front() {
                        batch.push(p);
                    }
                }
                self.run_batch(lane, batch, ctx);
            }
        }
    }

    fn lane_done(&mut self, lane: usize, ctx: &mut Context<Self>) {
        self.lanes.lanes[lane].busy = false;
        self.kick(lane, ctx);
        self.check_drained();
    }

    fn run_batch(&mut self, lane: usize, batch: Vec<PendingSend>, ctx: &mut Context<Self>) {
        let (msgs, replies): (Vec<NewMessage>, Vec<Reply<Stored>>) =
            batch.into_iter().map(|p| (p.msg, p.reply)).unzip();
        let msgs = Arc::new(msgs);
        self.db
            .send(dbx::StoreBatch(msgs.clone()))
            .into_actor(self)
            .map(move |res, act, ctx| {
                let results = per_item(res, msgs.len());
                for ((m, reply), r) in msgs.iter().zip(replies).zip(results) {
                    act.stored(m, reply, r);
                }
                act.lane_done(lane, ctx);
            })
            .spawn(ctx);
    }

    /// Answer one send and, if it was newly stored, deliver it.
    fn stored(&mut self, m: &NewMessage, reply: Reply<Stored>, r: Result<Stored, ChatError>) {
        match r {
            Ok(stored) => {
                let origin = match &reply {
                    Reply::Session { id, .. } => Some(*id),
                    Reply::Api(_) => None,
                };
                if !stored.duplicate {
                    self.stats.messages_stored += 1;
                    METRICS.messages_stored.inc();
                    self.fan_out(m, &stored, origin);
                }
                match reply {
                    Reply::Session { id, r#ref } => {
                        let conv = stored.conv.to_string();
                        let frame = ServerFrame::Sent {
                            r#ref: r#ref.as_deref(),
                            client_id: m.client_id.as_deref(),
                            conv: &conv,
                            seq: stored.seq,
                            ts: stored.ts,
                        }
                        .to_text();
                        self.reply_frame(id, frame);
                    }
                    Reply::Api(tx) => {
                        let _ = tx.send(Ok(stored));
                    }
                }
            }
            Err(e) => {
                if matches!(reply, Reply::Session { .. }) {
                    self.refund_rate(&m.sender);
                }
                self.reply_error(reply, e);
            }
        }
    }

    /// Serialise the message once and queue the same bytes for every session
    /// of every recipient and the sender's other sessions (not `origin`).
    fn fan_out(&mut self, m: &NewMessage, stored: &Stored, origin: Option<SessionId>) {
        let view = MessageView {
            conv: stored.conv.to_string(),
            seq: stored.seq,
            from: m.sender.to_string(),
            to: m.to.clone(),
            body: m.body.clone(),
            ts: stored.ts,
            client_id: m.client_id.clone(),
        };
        let frame = ServerFrame::Message(&view).to_text();
        if let ConvKey::Direct(a, b) = &stored.conv {
            self.note_direct_peers(a, b);
        }
        self.cluster_publish_message(&stored.conv, stored.seq, &frame);
        let ev = SessionEvent::Message {
            conv: Arc::from(view.conv.as_str()),
            seq: stored.seq,
            frame,
        };
        self.deliver(&stored.conv, stored.seq, ev, origin);
    }

    fn run_group(&mut self, lane: usize, p: PendingGroup, ctx: &mut Context<Self>) {
        self.db
            .send(dbx::ChangeGroup {
                by: p.by.clone(),
                op: p.op.clone(),
            })
            .into_actor(self)
            .map(move |res, act, ctx| {
                let res = res.unwrap_or_else(|e| {
                    Err(ChatError::unavailable(format!("database executor: {e}")))
                });
                act.group_changed(p, res);
                act.lane_done(lane, ctx);
            })
            .spawn(ctx);
    }

    /// Update the membership cache and send the group event to every member
    /// (and to the user who left or was removed).
    fn group_changed(&mut self, p: PendingGroup, res: Result<GroupView, ChatError>) {
        let view = match res {
            Ok(v) => v,
            Err(e) => return self.reply_error(p.reply, e),
        };
        self.cache_group(&view);
        let by = p.by.as_ref().map(UserId::to_string);
        let group = view.group.clone();
        let (event, extra): (GroupEvent, Option<UserId>) = match &p.op {
            GroupOp::Create { .. } => (
                GroupEvent::Created {
                    group,
                    name: view.name.clone(),
                    owner: view.owner.clone(),
                    members: view.members.clone(),
                    by,
                },
                None,
            ),
            GroupOp::Add { user, .. } => (
                GroupEvent::Added {
                    group,
                    user: user.to_string(),
                    by,
                },
                None,
            ),
            GroupOp::Remove { user, .. } => (
                GroupEvent::Removed {
                    group,
                    user: user.to_string(),
                    by,
                },
                Some(user.clone()),
            ),
            GroupOp::Leave { .. } => {
                let user = p.by.clone();
                (
                    GroupEvent::Left {
                        group,
                        user: user.as_ref().map(UserId::to_string).unwrap_or_default(),
                        by,
                    },
                    user,
                )
            }
        };
        let mut recipients: BTreeSet<UserId> = view
            .members
            .iter()
            .filter_map(|m| UserId::parse(m).ok())
            .collect();
        let extra_user = extra.clone();
        recipients.extend(extra);
        let plain = SessionEvent::Frame(
            ServerFrame::Group {
                r#ref: None,
                event: &event,
            }
            .to_text(),
        );
        let requester = match &p.reply {
            Reply::Session { id, .. } => Some(*id),
            Reply::Api(_) => None,
        };
        for u in &recipients {
            self.push_user(u, &plain, requester);
        }
        if let SessionEvent::Frame(frame) = &plain {
            self.cluster_publish_group(&view, frame, extra_user.as_ref());
        }
        match p.reply {
            Reply::Session { id, r#ref } => {
                let frame = ServerFrame::Group {
                    r#ref: r#ref.as_deref(),
                    event: &event,
                }
                .to_text();
                self.reply_frame(id, frame);
            }
            Reply::Api(tx) => {
                let _ = tx.send(Ok(view));
            }
        }
    }
}
