//! The DbExecutor: a `SyncActor` on its own threads (a `SyncArbiter`) that runs
//! the queries of [`super::queries`] over the pool. Every operation is a typed
//! message answering `Result<_, ChatError>`; a database outage is
//! `unavailable` and the actor keeps running until the database is back.

use std::time::{Duration, Instant};

use actix::prelude::{Actor, Addr, Handler, Message, SyncArbiter, SyncContext};
use bytestring::ByteString;

use super::conn::{Pool, PooledConn};
use super::models::{Membership, NewMessage, Stored};
use super::queries::{groups, messages, users};
use crate::error::ChatError;
use crate::ids::{ConvKey, GroupId, UserId};
use crate::protocol::{GroupView, MessageView, ServerFrame};

pub struct DbExecutor {
    pool: Pool,
}

impl Actor for DbExecutor {
    type Context = SyncContext<Self>;
}

impl DbExecutor {
    /// Start `threads` executors over one pool.
    pub fn start(threads: usize, pool: Pool) -> Addr<DbExecutor> {
        SyncArbiter::start(threads, move || DbExecutor { pool: pool.clone() })
    }

    fn conn(&self) -> Result<PooledConn, ChatError> {
        Ok(self.pool.get()?)
    }

    pub(crate) fn timed<T>(
        &self,
        op: &'static str,
        f: impl FnOnce(&mut PooledConn) -> Result<T, ChatError>,
    ) -> Result<T, ChatError> {
        let started = Instant::now();
        let out = self.conn().and_then(|mut c| f(&mut c));
        let took = started.elapsed();
        crate::metrics::METRICS
            .db_seconds
            .with_label_values(&[op])
            .observe(took.as_secs_f64());
        if took > Duration::from_secs(1) {
            log::warn!("database {op} took {took:?}");
        }
        out
    }
}

/// Store one message (the ChatServer on behalf of a session or the API).
#[derive(Message)]
#[rtype(result = "Result<Stored, ChatError>")]
pub struct StoreMessage(pub NewMessage);

impl Handler<StoreMessage> for DbExecutor {
    type Result = Result<Stored, ChatError>;
    fn handle(&mut self, msg: StoreMessage, _: &mut SyncContext<Self>) -> Self::Result {
        let mut out = self.timed("store", |c| {
            messages::store_batch(c, std::slice::from_ref(&msg.0))
        })?;
        out.pop()
            .unwrap_or_else(|| Err(ChatError::unavailable("nothing stored")))
    }
}

/// Store a batch in one transaction (the ChatServer's write lanes): one result per message, in order.
#[derive(Message)]
#[rtype(result = "Result<messages::BatchResult, ChatError>")]
pub struct StoreBatch(pub std::sync::Arc<Vec<NewMessage>>);

impl Handler<StoreBatch> for DbExecutor {
    type Result = Result<messages::BatchResult, ChatError>;
    fn handle(&mut self, msg: StoreBatch, _: &mut SyncContext<Self>) -> Self::Result {
        self.timed("store_batch", |c| messages::store_batch(c, &msg.0))
    }
}

/// One backlog message, already serialised as a `message` frame.
#[derive(Clone, Debug)]
pub struct BacklogItem {
    pub conv: String,
    pub seq: i64,
    pub frame: ByteString,
}

/// A page of a user's backlog; `next` is where the following page starts
/// (`None`: this was the last page).
#[derive(Debug, Default)]
pub struct BacklogPage {
    pub items: Vec<BacklogItem>,
    pub next: Option<(String, i64)>,
}

/// Load a page of the user's undelivered messages (a session while syncing).
#[derive(Message)]
#[rtype(result = "Result<BacklogPage, ChatError>")]
pub struct LoadBacklog {
    pub user: UserId,
    pub after: Option<(String, i64)>,
    pub limit: i64,
}

impl Handler<LoadBacklog> for DbExecutor {
    type Result = Result<BacklogPage, ChatError>;
    fn handle(&mut self, msg: LoadBacklog, _: &mut SyncContext<Self>) -> Self::Result {
        self.timed("backlog", |c| {
            let after = msg.after.as_ref().map(|(k, s)| (k.as_str(), *s));
            let rows = messages::backlog_page(c, &msg.user, after, msg.limit)?;
            let full = rows.len() as i64 >= msg.limit;
            let items: Vec<BacklogItem> = rows
                .into_iter()
                .filter_map(|r| r.into_view())
                .map(|v| BacklogItem {
                    frame: ServerFrame::Message(&v).to_text(),
                    conv: v.conv,
                    seq: v.seq,
                })
                .collect();
            let next = if full {
                items.last().map(|i| (i.conv.clone(), i.seq))
            } else {
                None
            };
            Ok(BacklogPage { items, next })
        })
    }
}

/// A user acknowledges a conversation up to `seq` (a session).
#[derive(Message)]
#[rtype(result = "Result<(), ChatError>")]
pub struct Ack {
    pub user: UserId,
    pub conv: ConvKey,
    pub seq: i64,
}

impl Handler<Ack> for DbExecutor {
    type Result = Result<(), ChatError>;
    fn handle(&mut self, msg: Ack, _: &mut SyncContext<Self>) -> Self::Result {
        self.timed("ack", |c| messages::ack(c, &msg.user, &msg.conv, msg.seq))
    }
}

/// Many acks in one transaction (the ChatServer's ack batcher): one result per ack.
#[derive(Message)]
#[rtype(result = "Result<Vec<Result<(), ChatError>>, ChatError>")]
pub struct AckBatch(pub Vec<(UserId, ConvKey, i64)>);

impl Handler<AckBatch> for DbExecutor {
    type Result = Result<Vec<Result<(), ChatError>>, ChatError>;
    fn handle(&mut self, msg: AckBatch, _: &mut SyncContext<Self>) -> Self::Result {
        self.timed("ack_batch", |c| messages::ack_batch(c, &msg.0))
    }
}

/// A page of history (a session), newest first.
#[derive(Message)]
#[rtype(result = "Result<HistoryPage, ChatError>")]
pub struct History {
    pub user: UserId,
    pub conv: ConvKey,
    pub before_seq: Option<i64>,
    pub limit: i64,
}

#[derive(Debug)]
pub struct HistoryPage {
    pub messages: Vec<MessageView>,
    pub more: bool,
}

impl Handler<History> for DbExecutor {
    type Result = Result<HistoryPage, ChatError>;
    fn handle(&mut self, msg: History, _: &mut SyncContext<Self>) -> Self::Result {
        self.timed("history", |c| {
            let (rows, more) =
                messages::history(c, &msg.user, &msg.conv, msg.before_seq, msg.limit)?;
            Ok(HistoryPage {
                messages: rows.into_iter().filter_map(|r| r.into_view()).collect(),
                more,
            })
        })
    }
}

/// A change to a group, made by a user (`by`) or the server API (`by: None`).
#[derive(Clone, Debug)]
pub enum GroupOp {
    Create {
        group: GroupId,
        name: String,
        owner: UserId,
        members: Vec<UserId>,
    },
    Add {
        group: GroupId,
        user: UserId,
    },
    Remove {
        group: GroupId,
        user: UserId,
    },
    Leave {
        group: GroupId,
    },
}

/// Apply a group change (the ChatServer); answers the group as it is afterwards.
#[derive(Message)]
#[rtype(result = "Result<GroupView, ChatError>")]
pub struct ChangeGroup {
    pub by: Option<UserId>,
    pub op: GroupOp,
}

impl Handler<ChangeGroup> for DbExecutor {
    type Result = Result<GroupView, ChatError>;
    fn handle(&mut self, msg: ChangeGroup, _: &mut SyncContext<Self>) -> Self::Result {
        self.timed("group", |c| {
            let by = msg.by.as_ref();
            let group = match &msg.op {
                GroupOp::Create {
                    group,
                    name,
                    owner,
                    members,
                } => return groups::create(c, group, name, owner, members),
                GroupOp::Add { group, user } => groups::add(c, by, group, user).map(|_| group),
                GroupOp::Remove { group, user } => {
                    groups::remove(c, by, group, user).map(|_| group)
                }
                GroupOp::Leave { group } => match by {
                    Some(u) => groups::leave(c, u, group).map(|_| group),
                    None => Err(ChatError::bad_request("leave needs a user")),
                },
            }?;
            groups::get(c, group)
        })
    }
}

/// One group (the server API), or `not_found`.
#[derive(Message)]
#[rtype(result = "Result<GroupView, ChatError>")]
pub struct GetGroup(pub GroupId);

impl Handler<GetGroup> for DbExecutor {
    type Result = Result<GroupView, ChatError>;
    fn handle(&mut self, msg: GetGroup, _: &mut SyncContext<Self>) -> Self::Result {
        self.timed("get_group", |c| groups::get(c, &msg.0))
    }
}

/// The groups a user is a member of.
#[derive(Message)]
#[rtype(result = "Result<Vec<GroupView>, ChatError>")]
pub struct ListGroups(pub UserId);

impl Handler<ListGroups> for DbExecutor {
    type Result = Result<Vec<GroupView>, ChatError>;
    fn handle(&mut self, msg: ListGroups, _: &mut SyncContext<Self>) -> Self::Result {
        self.timed("list_groups", |c| groups::of_user(c, &msg.0))
    }
}

/// Every group with its members (the ChatServer's membership cache).
#[derive(Message)]
#[rtype(result = "Result<Vec<GroupView>, ChatError>")]
pub struct LoadGroups;

impl Handler<LoadGroups> for DbExecutor {
    type Result = Result<Vec<GroupView>, ChatError>;
    fn handle(&mut self, _: LoadGroups, _: &mut SyncContext<Self>) -> Self::Result {
        self.timed("load_groups", |c| Ok(groups::all(c)?))
    }
}

/// A user's membership of a conversation, if any.
#[derive(Message)]
#[rtype(result = "Result<Option<Membership>, ChatError>")]
pub struct GetMembership {
    pub conv: ConvKey,
    pub user: UserId,
}

impl Handler<GetMembership> for DbExecutor {
    type Result = Result<Option<Membership>, ChatError>;
    fn handle(&mut self, msg: GetMembership, _: &mut SyncContext<Self>) -> Self::Result {
        self.timed("membership", |c| {
            Ok(messages::membership(c, &msg.conv, &msg.user)?)
        })
    }
}

/// A user connected: record them and return their direct-conversation peers (for presence).
#[derive(Message)]
#[rtype(result = "Result<Vec<UserId>, ChatError>")]
pub struct UserOnline(pub UserId);

impl Handler<UserOnline> for DbExecutor {
    type Result = Result<Vec<UserId>, ChatError>;
    fn handle(&mut self, msg: UserOnline, _: &mut SyncContext<Self>) -> Self::Result {
        self.timed("user_online", |c| {
            users::touch(c, &msg.0)?;
            Ok(users::dm_peers(c, &msg.0)?)
        })
    }
}

/// Whether the database answers (readiness).
#[derive(Message)]
#[rtype(result = "Result<(), ChatError>")]
pub struct Ping;

impl Handler<Ping> for DbExecutor {
    type Result = Result<(), ChatError>;
    fn handle(&mut self, _: Ping, _: &mut SyncContext<Self>) -> Self::Result {
        use diesel::RunQueryDsl;
        self.timed("ping", |c| {
            diesel::sql_query("SELECT 1").execute(&mut **c)?;
            Ok(())
        })
    }
}
