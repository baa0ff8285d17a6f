//! The ChatServer actor: who is online (user -> sessions), group membership
//! (a cache of the database), presence, per-user send rates, and the write
//! lanes that store messages and group changes in order and fan them out.
//! It never waits on the database: work goes to the DbExecutor and comes
//! back as a future handled on this actor (see `lanes.rs`).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use bytestring::ByteString;
use tokio::sync::oneshot;

use super::acks::Acks;
use super::cluster::ClusterState;
use super::lanes::Lanes;
use super::rate::TokenBucket;
use crate::config::Config;
use crate::db::executor::{DbExecutor, GroupOp, UserOnline};
use crate::db::models::Stored;
use crate::error::ChatError;
use crate::ids::{GroupId, Target, UserId};
use crate::metrics::METRICS;
use crate::protocol::{GroupView, ServerFrame};

/// A session's key in the server's maps (a counter, never reused).
pub type SessionId = u64;

/// Close codes chat-hub uses besides the standard ones (see docs/PROTOCOL.md).
pub mod close {
    pub const GOING_AWAY: u16 = 1001;
    pub const PROTOCOL_ERROR: u16 = 1002;
    pub const UNSUPPORTED: u16 = 1003;
    pub const INVALID_UTF8: u16 = 1007;
    pub const POLICY: u16 = 1008;
    pub const TOO_BIG: u16 = 1009;
    pub const TRY_AGAIN_LATER: u16 = 1013;
    pub const HEARTBEAT_TIMEOUT: u16 = 4000;
    pub const DISCONNECTED_BY_API: u16 = 4001;
    pub const SESSION_LIMIT: u16 = 4002;
}

/// What the ChatServer sends to a session (or to a probe standing in for one).
#[derive(Message, Clone, Debug)]
#[rtype(result = "()")]
pub enum SessionEvent {
    /// A stored message; `conv`/`seq` let a syncing session merge it with its backlog.
    Message {
        conv: Arc<str>,
        seq: i64,
        frame: ByteString,
    },
    /// Any other frame, already serialised.
    Frame(ByteString),
    /// An error answering a malformed frame: it counts towards `max_bad_frames`.
    BadFrame(ByteString),
    /// An `ack` was applied: like any good frame, it ends a run of bad ones.
    AckAccepted,
    /// Close the connection with this code.
    Close { code: u16, reason: String },
}

/// Where the answer to a request goes.
#[derive(Debug)]
pub enum Reply<T> {
    /// Back to the session that sent the frame, with its `ref`.
    Session {
        id: SessionId,
        r#ref: Option<String>,
    },
    /// To an HTTP handler of the server API.
    Api(oneshot::Sender<Result<T, ChatError>>),
}

/// The knobs of the hub, taken from [`Config`].
#[derive(Clone, Debug)]
pub struct HubConfig {
    pub rate_per_sec: f64,
    pub rate_burst: u32,
    pub max_sessions_per_user: usize,
    pub lanes: usize,
    /// Sends queued per lane before new ones are answered `unavailable`.
    pub max_lane_queue: usize,
    /// Messages per store transaction.
    pub max_batch: usize,
}

impl HubConfig {
    pub fn from_config(c: &Config) -> Self {
        HubConfig {
            rate_per_sec: c.rate_per_sec,
            rate_burst: c.rate_burst,
            max_sessions_per_user: c.max_sessions_per_user,
            // SQLite admits one writer at a time, and its busy handler sleeps
            // rather than queues: several write lanes only take turns badly
            // (docs/PERFORMANCE.md). MariaDB locks rows, so lanes run in parallel.
            lanes: match c.database {
                crate::config::DatabaseUrl::Sqlite(_) => 1,
                crate::config::DatabaseUrl::Mysql(_) => c.db_threads.max(1),
            },
            max_lane_queue: 50_000,
            max_batch: 512,
        }
    }
}

pub(super) struct SessionEntry {
    pub user: UserId,
    pub recipient: Recipient<SessionEvent>,
}

struct OnlineUser {
    /// Oldest first.
    sessions: Vec<SessionId>,
    /// Bumped each time the user comes online, to discard stale presence loads.
    epoch: u64,
    /// Direct-conversation peers, once loaded; presence went out when they were.
    peers: Option<HashSet<UserId>>,
}

pub(super) struct GroupState {
    pub name: String,
    pub owner: UserId,
    pub members: BTreeSet<UserId>,
}

pub struct ChatServer {
    pub(super) db: Addr<DbExecutor>,
    pub(super) cfg: HubConfig,
    pub(super) sessions: HashMap<SessionId, SessionEntry>,
    online: HashMap<UserId, OnlineUser>,
    pub(super) groups: HashMap<GroupId, GroupState>,
    pub(super) user_groups: HashMap<UserId, BTreeSet<GroupId>>,
    rates: HashMap<UserId, TokenBucket>,
    pub(super) lanes: Lanes,
    pub(super) acks: Acks,
    epochs: u64,
    draining: Option<Vec<oneshot::Sender<()>>>,
    drained: bool,
    pub(super) stats: Stats,
    /// Cluster mode (`CHAT_HUB_REDIS_URL`); `None` standalone.
    pub(super) cluster: Option<ClusterState>,
}

/// Counters the server keeps (read by tests and `/metrics`).
#[derive(Clone, Debug, Default, MessageResponse)]
pub struct Stats {
    pub sessions: usize,
    pub users_online: usize,
    pub groups: usize,
    pub queued_writes: usize,
    pub messages_stored: u64,
    pub messages_delivered: u64,
    pub evictions: u64,
    pub rate_limited: u64,
    pub rejected: HashMap<&'static str, u64>,
    /// Cluster mode: connected to Redis.
    pub bus_up: bool,
    /// Cluster mode: other nodes heard from.
    pub cluster_nodes: usize,
    /// Cluster mode: users online on other nodes.
    pub remote_users: usize,
}

impl ChatServer {
    /// A server over `db`, with the groups known at start-up.
    pub fn new(db: Addr<DbExecutor>, cfg: HubConfig, groups: Vec<GroupView>) -> Self {
        let lanes = Lanes::new(cfg.lanes);
        let mut s = ChatServer {
            db,
            cfg,
            sessions: HashMap::new(),
            online: HashMap::new(),
            groups: HashMap::new(),
            user_groups: HashMap::new(),
            rates: HashMap::new(),
            lanes,
            acks: Acks::default(),
            epochs: 0,
            draining: None,
            drained: false,
            stats: Stats::default(),
            cluster: None,
        };
        for g in groups {
            s.cache_group(&g);
        }
        s
    }

    /// Put a group as the database returned it into the membership cache.
    pub(super) fn cache_group(&mut self, g: &GroupView) {
        let (Ok(id), Ok(owner)) = (GroupId::parse(&g.group), UserId::parse(&g.owner)) else {
            return;
        };
        let members: BTreeSet<UserId> = g
            .members
            .iter()
            .filter_map(|m| UserId::parse(m).ok())
            .collect();
        let empty = BTreeSet::new();
        let old = self.groups.get(&id).map_or(&empty, |o| &o.members);
        let gone: Vec<UserId> = old.difference(&members).cloned().collect();
        let added: Vec<UserId> = members.difference(old).cloned().collect();
        for u in &gone {
            if let Some(set) = self.user_groups.get_mut(u) {
                set.remove(&id);
                if set.is_empty() {
                    self.user_groups.remove(u);
                }
            }
        }
        for m in &added {
            self.user_groups
                .entry(m.clone())
                .or_default()
                .insert(id.clone());
        }
        self.groups.insert(
            id.clone(),
            GroupState {
                name: g.name.clone(),
                owner,
                members,
            },
        );
        self.cluster_members_changed(&id, &added, &gone);
    }

    /// Whether `user` has a session on this node.
    pub(super) fn is_online_here(&self, user: &UserId) -> bool {
        self.online.contains_key(user)
    }

    pub(super) fn online_count(&self) -> usize {
        self.online.len()
    }

    pub(super) fn online_users(&self) -> Vec<String> {
        self.online.keys().map(UserId::to_string).collect()
    }

    /// Queue a stored message for every session here of its conversation's
    /// users (members, for a group), except `skip`.
    pub(super) fn push_conv(
        &mut self,
        conv: &crate::ids::ConvKey,
        ev: &SessionEvent,
        skip: Option<SessionId>,
    ) -> usize {
        use crate::ids::ConvKey;
        let recipients: Vec<UserId> = match conv {
            ConvKey::Direct(a, b) if a == b => vec![a.clone()],
            ConvKey::Direct(a, b) => vec![a.clone(), b.clone()],
            ConvKey::Group(g) => self
                .groups
                .get(g)
                .map(|s| s.members.iter().cloned().collect())
                .unwrap_or_default(),
        };
        let mut n = 0;
        for u in &recipients {
            n += self.push_user(u, ev, skip);
        }
        self.stats.messages_delivered += n as u64;
        METRICS.messages_delivered.inc_by(n as u64);
        n
    }

    /// Close every session of `user` here with 4001; how many were closed.
    pub(super) fn close_user(&mut self, user: &UserId, reason: &str) -> usize {
        let ids: Vec<SessionId> = self
            .online
            .get(user)
            .map(|o| o.sessions.clone())
            .unwrap_or_default();
        for id in &ids {
            if let Some(e) = self.sessions.get(id) {
                e.recipient.do_send(SessionEvent::Close {
                    code: close::DISCONNECTED_BY_API,
                    reason: reason.to_string(),
                });
            }
            self.remove_session(*id);
        }
        ids.len()
    }

    pub(super) fn group_view(&self, id: &GroupId) -> Option<GroupView> {
        self.groups.get(id).map(|g| GroupView {
            group: id.to_string(),
            name: g.name.clone(),
            owner: g.owner.to_string(),
            members: g.members.iter().map(UserId::to_string).collect(),
        })
    }

    /// Queue an event for a session. A session whose queue is full is a slow
    /// consumer: it is dropped (it gets what it missed on reconnect).
    pub(super) fn push(&mut self, id: SessionId, ev: SessionEvent) {
        let Some(entry) = self.sessions.get(&id) else {
            return;
        };
        match entry.recipient.try_send(ev) {
            Ok(()) => {}
            Err(SendError::Full(_)) => {
                log::info!(
                    "session {id} of {} is not reading: disconnecting it",
                    entry.user
                );
                entry.recipient.do_send(SessionEvent::Close {
                    code: close::TRY_AGAIN_LATER,
                    reason: "too slow: outbound queue full".into(),
                });
                self.stats.evictions += 1;
                METRICS.evictions.inc();
                self.remove_session(id);
            }
            Err(SendError::Closed(_)) => self.remove_session(id),
        }
    }

    /// Queue an event for every session of `user`, except `skip`.
    pub(super) fn push_user(
        &mut self,
        user: &UserId,
        ev: &SessionEvent,
        skip: Option<SessionId>,
    ) -> usize {
        let ids: Vec<SessionId> = match self.online.get(user) {
            Some(o) => o
                .sessions
                .iter()
                .copied()
                .filter(|s| Some(*s) != skip)
                .collect(),
            None => return 0,
        };
        for id in &ids {
            self.push(*id, ev.clone());
        }
        ids.len()
    }

    pub(super) fn reply_frame(&mut self, id: SessionId, frame: ByteString) {
        self.push(id, SessionEvent::Frame(frame));
    }

    pub(super) fn reply_error<T>(&mut self, reply: Reply<T>, e: ChatError) {
        *self.stats.rejected.entry(e.code.as_str()).or_default() += 1;
        METRICS.rejected.with_label_values(&[e.code.as_str()]).inc();
        match reply {
            Reply::Session { id, r#ref } => {
                let frame = ServerFrame::error(r#ref.as_deref(), &e);
                let ev = if e.code.is_bad_frame() {
                    SessionEvent::BadFrame(frame)
                } else {
                    SessionEvent::Frame(frame)
                };
                self.push(id, ev);
            }
            Reply::Api(tx) => {
                let _ = tx.send(Err(e));
            }
        }
    }

    /// Remove a session from every map: the one place this happens, whatever
    /// ended the session (close, error, heartbeat, eviction, shutdown).
    pub(super) fn remove_session(&mut self, id: SessionId) {
        let Some(entry) = self.sessions.remove(&id) else {
            return;
        };
        let user = entry.user;
        let last = match self.online.get_mut(&user) {
            Some(o) => {
                o.sessions.retain(|s| *s != id);
                o.sessions.is_empty()
            }
            None => false,
        };
        if last {
            if let Some(o) = self.online.remove(&user) {
                // Online elsewhere in the cluster: still online for everyone.
                if o.peers.is_some() && !self.remote_online(&user) {
                    self.announce(&user, o.peers.as_ref(), false);
                }
                self.cluster_user_left(&user, o.peers.as_ref());
            }
        }
    }

    /// Everyone whose presence `user` cares about: direct peers and co-members.
    fn contacts(&self, user: &UserId, peers: Option<&HashSet<UserId>>) -> HashSet<UserId> {
        let mut out: HashSet<UserId> = peers.cloned().unwrap_or_default();
        if let Some(gs) = self.user_groups.get(user) {
            for g in gs {
                if let Some(state) = self.groups.get(g) {
                    out.extend(state.members.iter().cloned());
                }
            }
        }
        out.remove(user);
        out
    }

    /// Tell `user`'s online contacts that `user` came online or went offline.
    pub(super) fn announce(
        &mut self,
        user: &UserId,
        peers: Option<&HashSet<UserId>>,
        online: bool,
    ) {
        let ev = SessionEvent::Frame(
            ServerFrame::Presence {
                user: user.as_str(),
                online,
            }
            .to_text(),
        );
        // Contacts still loading their own peers are skipped: their snapshot,
        // sent once loaded, tells them (so nobody hears "online" twice).
        let contacts: Vec<UserId> = self
            .contacts(user, peers)
            .into_iter()
            .filter(|c| self.is_announced(c))
            .collect();
        for c in contacts {
            self.push_user(&c, &ev, None);
        }
    }

    /// Tell `user`'s sessions which of their contacts are online now.
    fn presence_snapshot(&mut self, user: &UserId, only: Option<SessionId>) {
        let peers = self.online.get(user).and_then(|o| o.peers.clone());
        let online: Vec<UserId> = self
            .contacts(user, peers.as_ref())
            .into_iter()
            .filter(|c| self.is_announced(c) || self.remote_online(c))
            .collect();
        for c in online {
            let ev = SessionEvent::Frame(
                ServerFrame::Presence {
                    user: c.as_str(),
                    online: true,
                }
                .to_text(),
            );
            match only {
                Some(id) => self.push(id, ev),
                None => {
                    self.push_user(user, &ev, None);
                }
            }
        }
    }

    pub(super) fn is_announced(&self, user: &UserId) -> bool {
        self.online.get(user).is_some_and(|o| o.peers.is_some())
    }

    /// Two users now share a direct conversation: make them each other's peers
    /// (and tell each about the other if both are online).
    pub(super) fn note_direct_peers(&mut self, a: &UserId, b: &UserId) {
        if a == b {
            return;
        }
        for (x, y) in [(a, b), (b, a)] {
            let added = match self.online.get_mut(x).and_then(|o| o.peers.as_mut()) {
                Some(p) => p.insert(y.clone()),
                None => false,
            };
            if added {
                self.cluster_peer_added(x, y);
            }
            if added && (self.is_announced(y) || self.remote_online(y)) {
                let ev = SessionEvent::Frame(
                    ServerFrame::Presence {
                        user: y.as_str(),
                        online: true,
                    }
                    .to_text(),
                );
                self.push_user(x, &ev, None);
            }
        }
    }

    /// Take a send token for `user`; `false`: over the rate.
    pub(super) fn take_rate(&mut self, user: &UserId) -> bool {
        let (rate, burst) = (self.cfg.rate_per_sec, self.cfg.rate_burst);
        let now = Instant::now();
        self.rates
            .entry(user.clone())
            .or_insert_with(|| TokenBucket::full(burst, now))
            .take(now, rate, burst)
    }

    pub(super) fn refund_rate(&mut self, user: &UserId) {
        let burst = self.cfg.rate_burst;
        if let Some(b) = self.rates.get_mut(user) {
            b.refund(burst);
        }
    }

    /// Called when a lane went idle: finish a pending drain.
    pub(super) fn check_drained(&mut self) {
        if self.draining.is_none() || !self.lanes.idle() || !self.acks.idle() {
            return;
        }
        self.drained = true;
        let ids: Vec<SessionId> = self.sessions.keys().copied().collect();
        for id in ids {
            if let Some(e) = self.sessions.get(&id) {
                e.recipient.do_send(SessionEvent::Close {
                    code: close::GOING_AWAY,
                    reason: "server shutting down".into(),
                });
            }
            self.remove_session(id);
        }
        self.cluster_bye();
        for tx in self.draining.take().unwrap_or_default() {
            let _ = tx.send(());
        }
    }
}

impl Actor for ChatServer {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        // The server's own mailbox is unbounded in what it accepts from do_send;
        // what clients can put there is bounded by their sessions (rate, queue).
        ctx.run_interval(Duration::from_secs(60), |act, _| {
            let (rate, burst, now) = (act.cfg.rate_per_sec, act.cfg.rate_burst, Instant::now());
            act.rates.retain(|_, b| !b.is_full(now, rate, burst));
        });
        self.cluster_started(ctx);
    }
}

/// Hand a client request (a session's frame, an API call) to the server,
/// counted in the `chat_hub_server_mailbox_depth` gauge until it is handled.
pub fn submit<M>(server: &Addr<ChatServer>, msg: M)
where
    M: Message + Send + 'static,
    M::Result: Send,
    ChatServer: Handler<M>,
{
    METRICS.server_mailbox.inc();
    server.do_send(msg);
}

/// A session opened (the session itself, once, when it starts). The reply
/// comes once it is registered, so the session can load its backlog after.
#[derive(Message)]
#[rtype(result = "bool")]
pub struct Connect {
    pub id: SessionId,
    pub user: UserId,
    pub session: Recipient<SessionEvent>,
}

impl Handler<Connect> for ChatServer {
    type Result = ResponseActFuture<Self, bool>;

    fn handle(&mut self, msg: Connect, ctx: &mut Context<Self>) -> Self::Result {
        let subscribed = self.connect(msg, ctx);
        match subscribed {
            None => Box::pin(fut::ready(!self.drained)),
            Some(rx) => Box::pin(
                async move {
                    let _ = tokio::time::timeout(super::cluster::SUBSCRIBE_WAIT, rx).await;
                }
                .into_actor(self)
                .map(|_, act, _| !act.drained),
            ),
        }
    }
}

impl ChatServer {
    /// Register a session; in a cluster, the user's first session here
    /// returns the wait for their channels.
    fn connect(&mut self, msg: Connect, ctx: &mut Context<Self>) -> Option<oneshot::Receiver<()>> {
        if self.drained {
            msg.session.do_send(SessionEvent::Close {
                code: close::GOING_AWAY,
                reason: "server shutting down".into(),
            });
            return None;
        }
        let Connect { id, user, session } = msg;
        self.sessions.insert(
            id,
            SessionEntry {
                user: user.clone(),
                recipient: session,
            },
        );
        let first = !self.online.contains_key(&user);
        if first {
            self.epochs += 1;
            self.online.insert(
                user.clone(),
                OnlineUser {
                    sessions: vec![id],
                    epoch: self.epochs,
                    peers: None,
                },
            );
            let subscribed = self.cluster_user_joined(&user);
            let epoch = self.epochs;
            let u = user.clone();
            self.db
                .send(UserOnline(user.clone()))
                .into_actor(self)
                .map(move |res, act, _| {
                    act.peers_loaded(
                        &u,
                        epoch,
                        res.unwrap_or_else(|e| Err(ChatError::unavailable(e.to_string()))),
                    )
                })
                .spawn(ctx);
            return subscribed;
        } else {
            let over: Vec<SessionId> = match self.online.get_mut(&user) {
                Some(o) => {
                    o.sessions.push(id);
                    let n = o
                        .sessions
                        .len()
                        .saturating_sub(self.cfg.max_sessions_per_user);
                    o.sessions[..n].to_vec()
                }
                None => Vec::new(),
            };
            for old in over {
                if let Some(e) = self.sessions.get(&old) {
                    e.recipient.do_send(SessionEvent::Close {
                        code: close::SESSION_LIMIT,
                        reason: "too many sessions: the oldest was closed".into(),
                    });
                }
                self.remove_session(old);
            }
            if self.is_announced(&user) {
                self.presence_snapshot(&user, Some(id));
            }
        }
        None
    }
}

impl ChatServer {
    fn peers_loaded(&mut self, user: &UserId, epoch: u64, res: Result<Vec<UserId>, ChatError>) {
        let peers: HashSet<UserId> = match res {
            Ok(p) => p.into_iter().collect(),
            Err(e) => {
                // Presence is best effort: without the peers, announce to co-members only.
                log::warn!("presence peers of {user} not loaded: {e}");
                HashSet::new()
            }
        };
        match self.online.get_mut(user) {
            Some(o) if o.epoch == epoch => o.peers = Some(peers.clone()),
            _ => return,
        }
        self.cluster_peers_loaded(user, &peers);
        // Online elsewhere in the cluster: contacts were told then.
        if !self.remote_online(user) {
            self.announce(user, Some(&peers), true);
        }
        self.presence_snapshot(user, None);
    }
}

/// A session ended (its `stopping()`).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Disconnect {
    pub id: SessionId,
}

impl Handler<Disconnect> for ChatServer {
    type Result = ();
    fn handle(&mut self, msg: Disconnect, _: &mut Context<Self>) {
        self.remove_session(msg.id);
    }
}

/// A message to store and deliver: from a session's `send` frame, or the
/// server API publishing as `sender`.
#[derive(Message)]
#[rtype(result = "()")]
pub struct ClientSend {
    pub sender: UserId,
    pub to: Target,
    pub body: String,
    pub client_id: Option<String>,
    pub reply: Reply<Stored>,
}

/// A `typing` frame (a session).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Typing {
    pub session: SessionId,
    pub user: UserId,
    pub to: Target,
    pub r#ref: Option<String>,
}

impl Handler<Typing> for ChatServer {
    type Result = ();
    fn handle(&mut self, msg: Typing, _: &mut Context<Self>) {
        METRICS.server_mailbox.dec();
        let reply: Reply<()> = Reply::Session {
            id: msg.session,
            r#ref: msg.r#ref,
        };
        let (conv, targets): (String, Vec<UserId>) = match &msg.to {
            Target::User(u) => (
                crate::ids::ConvKey::direct(&msg.user, u).to_string(),
                vec![u.clone()],
            ),
            Target::Group(g) => match self.check_group_member(g, &msg.user) {
                Ok(members) => (format!("group:{g}"), members),
                Err(e) => return self.reply_error(reply, e),
            },
        };
        let ev = SessionEvent::Frame(
            ServerFrame::Typing {
                conv: &conv,
                from: msg.user.as_str(),
            }
            .to_text(),
        );
        for t in targets.iter().filter(|t| **t != msg.user) {
            self.push_user(t, &ev, None);
        }
    }
}

impl ChatServer {
    /// The members of `g` if `user` is one of them; `not_found` / `forbidden` otherwise.
    pub(super) fn check_group_member(
        &self,
        g: &GroupId,
        user: &UserId,
    ) -> Result<Vec<UserId>, ChatError> {
        match self.groups.get(g) {
            None => Err(ChatError::not_found(format!("no group {g}"))),
            Some(s) if !s.members.contains(user) => {
                Err(ChatError::forbidden(format!("not a member of group {g}")))
            }
            Some(s) => Ok(s.members.iter().cloned().collect()),
        }
    }
}

/// A change to a group: from a session (`by` the user) or the server API (`by: None`).
#[derive(Message)]
#[rtype(result = "()")]
pub struct ChangeGroup {
    pub by: Option<UserId>,
    pub op: GroupOp,
    pub reply: Reply<GroupView>,
}

/// A `groups` frame: list the user's groups (answered from the cache).
#[derive(Message)]
#[rtype(result = "()")]
pub struct ListGroups {
    pub session: SessionId,
    pub user: UserId,
    pub r#ref: Option<String>,
}

impl Handler<ListGroups> for ChatServer {
    type Result = ();
    fn handle(&mut self, msg: ListGroups, _: &mut Context<Self>) {
        METRICS.server_mailbox.dec();
        let ids: Vec<GroupId> = self
            .user_groups
            .get(&msg.user)
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default();
        let groups: Vec<GroupView> = ids.iter().filter_map(|g| self.group_view(g)).collect();
        let frame = ServerFrame::Groups {
            r#ref: msg.r#ref.as_deref(),
            groups: &groups,
        }
        .to_text();
        self.reply_frame(msg.session, frame);
    }
}

/// Close every session of a user (the server API), with close code 4001.
#[derive(Message)]
#[rtype(result = "usize")]
pub struct DisconnectUser {
    pub user: UserId,
    pub reason: String,
}

impl Handler<DisconnectUser> for ChatServer {
    type Result = ResponseActFuture<Self, usize>;
    fn handle(&mut self, msg: DisconnectUser, _: &mut Context<Self>) -> Self::Result {
        let here = self.close_user(&msg.user, &msg.reason);
        let Some((req, rx)) = self.cluster_disconnect(&msg.user, &msg.reason) else {
            return Box::pin(fut::ready(here));
        };
        let wait = super::cluster::DISCONNECT_WAIT;
        Box::pin(
            async move {
                let _ = tokio::time::timeout(wait, rx).await;
            }
            .into_actor(self)
            .map(move |_, act, _| here + act.cluster_disconnect_done(req)),
        )
    }
}

/// Graceful shutdown: finish storing what was received, then close every
/// session with 1001. Answers when that is done.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Shutdown;

impl Handler<Shutdown> for ChatServer {
    type Result = ResponseFuture<()>;
    fn handle(&mut self, _: Shutdown, _: &mut Context<Self>) -> Self::Result {
        let (tx, rx) = oneshot::channel();
        self.draining.get_or_insert_with(Vec::new).push(tx);
        self.check_drained();
        Box::pin(async move {
            let _ = rx.await;
        })
    }
}

/// Read the server's counters.
#[derive(Message)]
#[rtype(result = "Stats")]
pub struct GetStats;

impl Handler<GetStats> for ChatServer {
    type Result = Stats;
    fn handle(&mut self, _: GetStats, _: &mut Context<Self>) -> Stats {
        let (bus_up, cluster_nodes, remote_users) = self.cluster_view();
        Stats {
            sessions: self.sessions.len(),
            users_online: self.online.len(),
            groups: self.groups.len(),
            queued_writes: self.lanes.queued(),
            bus_up,
            cluster_nodes,
            remote_users,
            ..self.stats.clone()
        }
    }
}

/// Whether a session is registered (tests: every way a session ends removes it).
#[derive(Message)]
#[rtype(result = "bool")]
pub struct HasSession(pub SessionId);

impl Handler<HasSession> for ChatServer {
    type Result = bool;
    fn handle(&mut self, msg: HasSession, _: &mut Context<Self>) -> bool {
        self.sessions.contains_key(&msg.0)
    }
}
