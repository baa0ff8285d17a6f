//! The ChatServer in a cluster (`CHAT_HUB_REDIS_URL` set): what it tells the
//! other nodes through the [`Bus`] and what it does with what they say.
//!
//! - Messages: after a message is stored, the node publishes it on the
//!   recipients' user channels (direct) or the group's channel; a node
//!   subscribes to those channels only while it holds a session that needs
//!   them. Every node delivers a conversation's messages to its sessions in
//!   seq order through a small reorder buffer ([`ConvOrder`]): a message that
//!   arrives ahead of a missing one waits up to [`GAP_WAIT`], then the gap is
//!   read from the database.
//! - Group changes go to every node (each keeps the whole membership cache).
//! - Presence: each node says when a user gets their first or loses their
//!   last session there, beats every 5 s, and answers a newcomer's `hello`
//!   with the list of its users. A node not heard from for 15 s is presumed
//!   dead and its users offline.
//! - `disconnect` through the server API reaches every node that holds a
//!   session of the user; the answer counts what they closed.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use bytestring::ByteString;
use tokio::sync::oneshot;

use super::server::{ChatServer, SessionEvent, SessionId};
use crate::cluster::{Bus, BusEvent, BusMsg, BEAT_EVERY, NODE_EXPIRY};
use crate::db::executor::LoadGroups;
use crate::db::range::LoadRange;
use crate::ids::{ConvKey, GroupId, UserId};
use crate::metrics::METRICS;

/// How long a message that arrived ahead of its predecessor waits for it
/// before the gap is read from the database.
pub const GAP_WAIT: Duration = Duration::from_millis(150);
/// How long the first messages of a conversation new to this node wait for
/// lower seqs from other nodes (racing on the bus) before they go out.
pub const SETTLE_WAIT: Duration = Duration::from_millis(40);
/// Once settled, a new conversation's messages stored up to this long before
/// it became known here and below the lowest seq seen are read from the
/// database and go out first: they were racing on the bus (on a loaded
/// machine, by more than the settling time).
const RACE_WINDOW_MS: i64 = 5_000;
/// How often held messages are looked at.
const ORDER_TICK: Duration = Duration::from_millis(20);
/// Messages held per conversation before they are delivered anyway.
const MAX_HELD: usize = 10_000;
/// A conversation's order state is forgotten after this long unused.
const ORDER_IDLE: Duration = Duration::from_secs(300);
/// Longest wait for other nodes' answers to a `disconnect`.
pub(super) const DISCONNECT_WAIT: Duration = Duration::from_secs(2);

/// How to join a cluster.
#[derive(Clone, Debug)]
pub struct ClusterConfig {
    pub redis_url: String,
    pub node: String,
    pub prefix: String,
}

struct RemoteNode {
    users: HashSet<UserId>,
    seen: Instant,
}

struct Held {
    ev: SessionEvent,
    skip: Option<SessionId>,
}

/// A conversation's live order on this node.
struct ConvOrder {
    key: ConvKey,
    /// The highest seq delivered here.
    last: i64,
    /// Messages that came ahead of a missing one.
    held: BTreeMap<i64, Held>,
    /// Since when the first held message has been waiting.
    gap_since: Option<Instant>,
    /// A gap fill is being read.
    filling: bool,
    /// New here: nothing goes out before this (lower seqs may still come).
    settle_until: Option<Instant>,
    /// When it became known here (Unix ms).
    created_ms: i64,
    touched: Instant,
}

impl ConvOrder {
    /// Take the held messages that now follow `last` without a gap.
    fn drain(&mut self) -> Vec<Held> {
        let mut out = Vec::new();
        while let Some(e) = self.held.first_entry() {
            if *e.key() != self.last + 1 {
                break;
            }
            self.last += 1;
            out.push(e.remove());
        }
        if self.held.is_empty() {
            self.gap_since = None;
        }
        out
    }

    /// Give up on the missing seqs before the first held message.
    fn skip_gap(&mut self) -> Vec<Held> {
        match self.held.first_key_value() {
            Some((&first, _)) => self.skip_to(first - 1),
            None => Vec::new(),
        }
    }

    /// Count everything up to `seq` as delivered (read, or not coming) and
    /// take what then follows without a gap; a gap left starts its wait now.
    fn skip_to(&mut self, seq: i64) -> Vec<Held> {
        self.last = self.last.max(seq);
        while let Some(e) = self.held.first_entry() {
            if *e.key() > self.last {
                break;
            }
            e.remove(); // at or below what was read: already delivered from the read
        }
        let out = self.drain();
        if !self.held.is_empty() {
            self.gap_since = Some(Instant::now());
        }
        out
    }
}

struct PendingDisconnect {
    waiting: HashSet<String>,
    closed: usize,
    tx: Option<oneshot::Sender<()>>,
}

/// The cluster side of the ChatServer.
pub(super) struct ClusterState {
    pub(super) bus: Bus,
    nodes: HashMap<String, RemoteNode>,
    /// Users online on other nodes: on how many of them.
    remote_users: HashMap<UserId, u32>,
    /// Locally online members per group (the group channel is subscribed while > 0).
    group_refs: HashMap<GroupId, usize>,
    order: HashMap<Arc<str>, ConvOrder>,
    gaps: HashSet<Arc<str>>,
    /// Direct conversations in `order`, by user.
    direct_convs: HashMap<UserId, HashSet<Arc<str>>>,
    /// Locally online users who have the key user as a direct peer.
    peer_of: HashMap<UserId, HashSet<UserId>>,
    disconnects: HashMap<u64, PendingDisconnect>,
    next_req: u64,
    last_hello: Option<Instant>,
    up: bool,
}

impl ClusterState {
    fn new(bus: Bus) -> Self {
        ClusterState {
            bus,
            nodes: HashMap::new(),
            remote_users: HashMap::new(),
            group_refs: HashMap::new(),
            order: HashMap::new(),
            gaps: HashSet::new(),
            direct_convs: HashMap::new(),
            peer_of: HashMap::new(),
            disconnects: HashMap::new(),
            next_req: 0,
            last_hello: None,
            up: false,
        }
    }

    fn node(&self) -> String {
        self.bus.node.to_string()
    }

    fn publish_all(&self, msg: &BusMsg) {
        self.bus.publish(self.bus.all_channel(), msg);
    }

    /// Note that `user` is on `node` (or no longer); whether anything changed.
    fn set_remote(&mut self, node: &str, user: &UserId, online: bool) -> bool {
        let n = self
            .nodes
            .entry(node.to_string())
            .or_insert_with(|| RemoteNode {
                users: HashSet::new(),
                seen: Instant::now(),
            });
        let changed = if online {
            n.users.insert(user.clone())
        } else {
            n.users.remove(user)
        };
        if changed {
            if online {
                *self.remote_users.entry(user.clone()).or_default() += 1;
            } else if let Some(c) = self.remote_users.get_mut(user) {
                *c = c.saturating_sub(1);
                if *c == 0 {
                    self.remote_users.remove(user);
                }
            }
        }
        changed
    }
}

impl ChatServer {
    /// Start a ChatServer that joins the cluster of `cluster` (or runs alone).
    pub fn start_with(
        db: Addr<crate::db::DbExecutor>,
        cfg: super::server::HubConfig,
        groups: Vec<crate::protocol::GroupView>,
        cluster: Option<ClusterConfig>,
    ) -> Result<Addr<ChatServer>, String> {
        let client = match &cluster {
            Some(c) => Some(Bus::client(&c.redis_url)?),
            None => None,
        };
        Ok(ChatServer::create(move |ctx| {
            let mut s = ChatServer::new(db, cfg, groups);
            if let (Some(c), Some(client)) = (cluster, client) {
                let bus = Bus::start(client, &c.node, &c.prefix, ctx.address().recipient());
                s.cluster = Some(ClusterState::new(bus));
            }
            s
        }))
    }

    /// (connected to Redis, other nodes, users online elsewhere) for `Stats`.
    pub(super) fn cluster_view(&self) -> (bool, usize, usize) {
        self.cluster.as_ref().map_or((false, 0, 0), |c| {
            (c.up, c.nodes.len(), c.remote_users.len())
        })
    }

    /// The users of `conv` with a session on this node.
    fn local_recipients(&self, conv: &ConvKey) -> Vec<String> {
        let users: Vec<UserId> = match conv {
            ConvKey::Direct(a, b) => vec![a.clone(), b.clone()],
            ConvKey::Group(g) => self
                .groups
                .get(g)
                .map(|s| s.members.iter().cloned().collect())
                .unwrap_or_default(),
        };
        users
            .into_iter()
            .filter(|u| self.is_online_here(u))
            .map(|u| u.to_string())
            .collect()
    }

    /// Whether `user` is online on another node.
    pub(super) fn remote_online(&self, user: &UserId) -> bool {
        self.cluster
            .as_ref()
            .is_some_and(|c| c.remote_users.contains_key(user))
    }

    /// Timers of cluster mode: beats, dead nodes, gap fills, idle order state.
    pub(super) fn cluster_started(&mut self, ctx: &mut Context<Self>) {
        if self.cluster.is_none() {
            return;
        }
        ctx.run_interval(BEAT_EVERY, |act, _| act.beat());
        ctx.run_interval(ORDER_TICK, |act, ctx| act.fill_gaps(ctx));
        ctx.run_interval(Duration::from_secs(60), |act, _| {
            if let Some(cl) = act.cluster.as_mut() {
                let now = Instant::now();
                cl.order.retain(|_, o| {
                    !o.held.is_empty() || now.duration_since(o.touched) < ORDER_IDLE
                });
            }
        });
    }

    fn beat(&mut self) {
        let users = self.online_count();
        let Some(cl) = self.cluster.as_mut() else {
            return;
        };
        cl.publish_all(&BusMsg::Beat {
            node: cl.node(),
            users,
        });
        let now = Instant::now();
        let dead: Vec<String> = cl
            .nodes
            .iter()
            .filter(|(_, n)| now.duration_since(n.seen) > NODE_EXPIRY)
            .map(|(id, _)| id.clone())
            .collect();
        METRICS
            .cluster_nodes
            .set((cl.nodes.len() - dead.len()) as i64);
        for node in dead {
            log::warn!(
                "cluster: node {node} not heard from for {NODE_EXPIRY:?}: its users are offline"
            );
            self.drop_node(&node);
        }
    }

    /// Forget a node that left or died: its users are offline unless seen elsewhere.
    fn drop_node(&mut self, node: &str) {
        let Some(cl) = self.cluster.as_mut() else {
            return;
        };
        let Some(n) = cl.nodes.get(node) else {
            return;
        };
        let users: Vec<UserId> = n.users.iter().cloned().collect();
        for u in users {
            self.remote_presence(node, u, false);
        }
        if let Some(cl) = self.cluster.as_mut() {
            cl.nodes.remove(node);
            METRICS.cluster_nodes.set(cl.nodes.len() as i64);
        }
    }

    /// `user` is (or no longer is) on `node`: tell local contacts if that
    /// changed whether the user is online anywhere.
    fn remote_presence(&mut self, node: &str, user: UserId, online: bool) {
        let before = self.is_announced(&user) || self.remote_online(&user);
        let Some(cl) = self.cluster.as_mut() else {
            return;
        };
        if !cl.set_remote(node, &user, online) {
            return;
        }
        let peers = cl.peer_of.get(&user).cloned();
        let after = self.is_announced(&user) || self.remote_online(&user);
        if before != after {
            self.announce(&user, peers.as_ref(), after);
        }
    }

    /// `user` got their first session on this node. The receiver resolves
    /// once this node hears the user's channels (before the backlog is read,
    /// so that nothing stored meanwhile is missed live).
    pub(super) fn cluster_user_joined(&mut self, user: &UserId) -> Option<oneshot::Receiver<()>> {
        let groups: Vec<GroupId> = self
            .user_groups
            .get(user)
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default();
        let cl = self.cluster.as_mut()?;
        let mut subs = vec![cl.bus.user_channel(user.as_str())];
        for g in groups {
            let r = cl.group_refs.entry(g.clone()).or_default();
            *r += 1;
            if *r == 1 {
                subs.push(cl.bus.group_channel(g.as_str()));
            }
        }
        let rx = cl.bus.subscribe_confirmed(subs);
        cl.publish_all(&BusMsg::Presence {
            node: cl.node(),
            user: user.to_string(),
            online: true,
        });
        Some(rx)
    }

    /// `user` lost their last session on this node (`peers`: their direct peers, if loaded).
    pub(super) fn cluster_user_left(&mut self, user: &UserId, peers: Option<&HashSet<UserId>>) {
        let groups: Vec<GroupId> = self
            .user_groups
            .get(user)
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default();
        let Some(cl) = self.cluster.as_mut() else {
            return;
        };
        let mut unsubs = vec![cl.bus.user_channel(user.as_str())];
        let mut forget: Vec<Arc<str>> = Vec::new();
        for g in groups {
            if let Some(r) = cl.group_refs.get_mut(&g) {
                *r = r.saturating_sub(1);
                if *r == 0 {
                    cl.group_refs.remove(&g);
                    unsubs.push(cl.bus.group_channel(g.as_str()));
                    forget.push(Arc::from(ConvKey::Group(g).to_string()));
                }
            }
        }
        cl.bus.unsubscribe(unsubs);
        cl.publish_all(&BusMsg::Presence {
            node: cl.node(),
            user: user.to_string(),
            online: false,
        });
        for p in peers.into_iter().flatten() {
            if let Some(set) = cl.peer_of.get_mut(p) {
                set.remove(user);
                if set.is_empty() {
                    cl.peer_of.remove(p);
                }
            }
        }
        // Its conversations start afresh when the user is back: a gap met
        // then is what the backlog covers, not something to fill live.
        forget.extend(cl.direct_convs.remove(user).into_iter().flatten());
        for key in forget {
            self.forget_conv(&key);
        }
    }

    /// `user`'s direct peers are known (they are online here).
    pub(super) fn cluster_peers_loaded(&mut self, user: &UserId, peers: &HashSet<UserId>) {
        if let Some(cl) = self.cluster.as_mut() {
            for p in peers {
                cl.peer_of
                    .entry(p.clone())
                    .or_default()
                    .insert(user.clone());
            }
        }
    }

    /// `user` (online here) has a new direct peer.
    pub(super) fn cluster_peer_added(&mut self, user: &UserId, peer: &UserId) {
        if let Some(cl) = self.cluster.as_mut() {
            cl.peer_of
                .entry(peer.clone())
                .or_default()
                .insert(user.clone());
        }
    }

    /// Group membership changed in the cache: keep the group's channel
    /// subscribed exactly while a member is online here.
    pub(super) fn cluster_members_changed(
        &mut self,
        g: &GroupId,
        added: &[UserId],
        gone: &[UserId],
    ) {
        let joined = added.iter().filter(|u| self.is_online_here(u)).count();
        let left = gone.iter().filter(|u| self.is_online_here(u)).count();
        let Some(cl) = self.cluster.as_mut() else {
            return;
        };
        if joined == left {
            return;
        }
        let before = cl.group_refs.get(g).copied().unwrap_or(0);
        let after = (before + joined).saturating_sub(left);
        if after == 0 {
            cl.group_refs.remove(g);
        } else {
            cl.group_refs.insert(g.clone(), after);
        }
        if before == 0 && after > 0 {
            cl.bus.subscribe(vec![cl.bus.group_channel(g.as_str())]);
        } else if before > 0 && after == 0 {
            cl.bus.unsubscribe(vec![cl.bus.group_channel(g.as_str())]);
            let key: Arc<str> = Arc::from(ConvKey::Group(g.clone()).to_string());
            self.forget_conv(&key);
        }
    }

    /// Publish a stored message to the nodes whose users need it.
    pub(super) fn cluster_publish_message(&self, conv: &ConvKey, seq: i64, frame: &ByteString) {
        let Some(cl) = self.cluster.as_ref() else {
            return;
        };
        let msg = BusMsg::Msg {
            node: cl.node(),
            conv: conv.to_string(),
            seq,
            frame: frame.to_string(),
        };
        let channels = match conv {
            ConvKey::Direct(a, b) if a == b => vec![cl.bus.user_channel(a.as_str())],
            ConvKey::Direct(a, b) => vec![
                cl.bus.user_channel(a.as_str()),
                cl.bus.user_channel(b.as_str()),
            ],
            ConvKey::Group(g) => vec![cl.bus.group_channel(g.as_str())],
        };
        cl.bus.publish_on(channels, &msg);
    }

    /// Publish a committed group change to every node.
    pub(super) fn cluster_publish_group(
        &self,
        view: &crate::protocol::GroupView,
        frame: &ByteString,
        extra: Option<&UserId>,
    ) {
        if let Some(cl) = self.cluster.as_ref() {
            cl.publish_all(&BusMsg::Group {
                node: cl.node(),
                group: view.clone(),
                frame: frame.to_string(),
                extra: extra.map(UserId::to_string),
            });
        }
    }

    /// Deliver a stored message to this node's sessions of its conversation,
    /// in seq order (standalone: at once, the write lane already ordered it).
    pub(super) fn deliver(
        &mut self,
        conv: &ConvKey,
        seq: i64,
        ev: SessionEvent,
        skip: Option<SessionId>,
    ) {
        let Some(cl) = self.cluster.as_mut() else {
            self.push_conv(conv, &ev, skip);
            return;
        };
        let key: Arc<str> = match &ev {
            SessionEvent::Message { conv, .. } => conv.clone(),
            _ => Arc::from(conv.to_string()),
        };
        let now = Instant::now();
        let fresh = !cl.order.contains_key(&key);
        // Alone in the cluster, nothing can race: no need to settle.
        let settle_until = (!cl.nodes.is_empty()).then(|| now + SETTLE_WAIT);
        let st = cl.order.entry(key.clone()).or_insert_with(|| ConvOrder {
            key: conv.clone(),
            last: seq - 1,
            held: BTreeMap::new(),
            gap_since: None,
            filling: false,
            settle_until,
            created_ms: crate::now_ms(),
            touched: now,
        });
        st.touched = now;
        if st.held.contains_key(&seq) {
            return; // a copy already waiting (a direct message comes on both users' channels)
        }
        let ready = if st.settle_until.is_some() {
            // New here: hold everything, the lowest seq seen sets the start.
            st.last = st.last.min(seq - 1);
            st.held.insert(seq, Held { ev, skip });
            Vec::new()
        } else if seq <= st.last {
            return; // a copy already delivered
        } else if seq > st.last + 1 {
            st.held.insert(seq, Held { ev, skip });
            st.gap_since.get_or_insert(now);
            if st.held.len() > MAX_HELD {
                st.skip_gap()
            } else {
                Vec::new()
            }
        } else {
            st.last = seq;
            let mut r = vec![Held { ev, skip }];
            r.extend(st.drain());
            r
        };
        if st.held.is_empty() {
            cl.gaps.remove(&key);
        } else {
            cl.gaps.insert(key.clone());
        }
        if fresh {
            if let ConvKey::Direct(a, b) = conv {
                for u in [a, b] {
                    cl.direct_convs
                        .entry(u.clone())
                        .or_default()
                        .insert(key.clone());
                }
            }
        }
        for h in ready {
            self.push_conv(conv, &h.ev, h.skip);
        }
    }

    /// Deliver what a conversation holds, gaps or not, and forget its order.
    fn forget_conv(&mut self, key: &Arc<str>) {
        let Some(cl) = self.cluster.as_mut() else {
            return;
        };
        cl.gaps.remove(key);
        let Some(st) = cl.order.remove(key) else {
            return;
        };
        if let ConvKey::Direct(a, b) = &st.key {
            for u in [a, b] {
                if let Some(set) = cl.direct_convs.get_mut(u) {
                    set.remove(key);
                    if set.is_empty() {
                        cl.direct_convs.remove(u);
                    }
                }
            }
        }
        for (_, h) in st.held {
            self.push_conv(&st.key, &h.ev, h.skip);
        }
    }

    /// Release conversations that settled, and read from the database the
    /// gaps that waited long enough.
    fn fill_gaps(&mut self, ctx: &mut Context<Self>) {
        let Some(cl) = self.cluster.as_mut() else {
            return;
        };
        if cl.gaps.is_empty() {
            return;
        }
        let now = Instant::now();
        let mut due: Vec<(Arc<str>, i64, i64, Option<i64>)> = Vec::new();
        let mut done: Vec<Arc<str>> = Vec::new();
        for k in &cl.gaps {
            let Some(st) = cl.order.get_mut(k) else {
                done.push(k.clone());
                continue;
            };
            if st.filling {
                continue;
            }
            if let Some(until) = st.settle_until {
                if now < until {
                    continue;
                }
                let Some(&first) = st.held.keys().next() else {
                    st.settle_until = None;
                    done.push(k.clone());
                    continue;
                };
                st.filling = true;
                due.push((
                    k.clone(),
                    0,
                    first - 1,
                    Some(st.created_ms - RACE_WINDOW_MS),
                ));
                continue;
            }
            let Some(since) = st.gap_since else {
                continue;
            };
            if now.duration_since(since) < GAP_WAIT {
                continue;
            }
            let Some(&first) = st.held.keys().next() else {
                continue;
            };
            st.filling = true;
            due.push((k.clone(), st.last, first - 1, None));
        }
        for k in done {
            cl.gaps.remove(&k);
        }
        for (key, after, upto, since_ts) in due {
            let settling = since_ts.is_some();
            // A new conversation's read skips what its users here have
            // acknowledged (they may have had it on another node).
            let acked_by = match (settling, cl_key(&self.cluster, &key)) {
                (true, Some(conv)) => self.local_recipients(&conv),
                _ => Vec::new(),
            };
            let req = LoadRange {
                conv: key.to_string(),
                after,
                upto,
                since_ts,
                acked_by,
            };
            self.db
                .send(req)
                .into_actor(self)
                .map(move |res, act, _| act.gap_filled(&key, upto, settling, res))
                .spawn(ctx);
        }
    }

    /// The messages of a gap (`.., upto]`) were read: deliver them, then
    /// what was held after them. `settling`: the read of a conversation new
    /// here, whose start it sets.
    fn gap_filled(
        &mut self,
        key: &Arc<str>,
        upto: i64,
        settling: bool,
        res: Result<Result<Vec<(i64, ByteString)>, crate::error::ChatError>, MailboxError>,
    ) {
        let Some(cl) = self.cluster.as_mut() else {
            return;
        };
        let Some(st) = cl.order.get_mut(key) else {
            return;
        };
        st.filling = false;
        if settling {
            st.settle_until = None;
            let first = match &res {
                Ok(Ok(rows)) => rows.first().map(|(seq, _)| *seq),
                _ => None,
            };
            st.last = first.map_or(upto, |f| (f - 1).min(upto));
        }
        let mut ready = Vec::new();
        match res {
            Ok(Ok(rows)) => {
                for (seq, frame) in rows {
                    if seq <= st.last {
                        continue; // arrived on the bus meanwhile
                    }
                    st.last = seq;
                    // A copy that came on the bus during the read keeps its
                    // origin (the sending session gets `sent`, not the message).
                    let h = match st.held.remove(&seq) {
                        Some(h) => h,
                        None => {
                            METRICS.gap_fills.inc();
                            Held {
                                ev: SessionEvent::Message {
                                    conv: key.clone(),
                                    seq,
                                    frame,
                                },
                                skip: None,
                            }
                        }
                    };
                    ready.push(h);
                }
            }
            Ok(Err(e)) => log::warn!("cluster: gap in {key} not read ({e}); delivering past it"),
            Err(e) => log::warn!("cluster: gap in {key} not read ({e}); delivering past it"),
        }
        // What the read did not find up to `upto` is not coming (the
        // recipients get anything missing from their backlog when they
        // reconnect); a gap opened after `upto` waits its own turn.
        ready.extend(st.skip_to(upto));
        let conv = st.key.clone();
        if st.held.is_empty() {
            cl.gaps.remove(key);
        }
        for h in ready {
            self.push_conv(&conv, &h.ev, h.skip);
        }
    }

    /// Connected to Redis (again): introduce ourselves, ask for the others'
    /// state, and reload the group cache (changes may have been missed).
    fn bus_up(&mut self, ctx: &mut Context<Self>) {
        let users = self.online_users();
        let Some(cl) = self.cluster.as_mut() else {
            return;
        };
        cl.publish_all(&BusMsg::Hello { node: cl.node() });
        cl.publish_all(&BusMsg::State {
            node: cl.node(),
            users,
        });
        self.db
            .send(LoadGroups)
            .into_actor(self)
            .map(|res, act, _| match res {
                Ok(Ok(groups)) => {
                    for g in &groups {
                        act.cache_group(g);
                    }
                }
                Ok(Err(e)) => log::warn!("cluster: groups not reloaded: {e}"),
                Err(e) => log::warn!("cluster: groups not reloaded: {e}"),
            })
            .spawn(ctx);
    }

    fn on_bus(&mut self, m: BusMsg) {
        let Some(cl) = self.cluster.as_mut() else {
            return;
        };
        let from = m.node().to_string();
        match cl.nodes.get_mut(&from) {
            Some(n) => n.seen = Instant::now(),
            None if matches!(m, BusMsg::Bye { .. }) => {}
            None => {
                log::info!("cluster: node {from} joined");
                cl.nodes.insert(
                    from.clone(),
                    RemoteNode {
                        users: HashSet::new(),
                        seen: Instant::now(),
                    },
                );
                METRICS.cluster_nodes.set(cl.nodes.len() as i64);
            }
        }
        match m {
            BusMsg::Msg {
                conv, seq, frame, ..
            } => {
                let Ok(key) = ConvKey::parse(&conv) else {
                    return;
                };
                if let ConvKey::Direct(a, b) = &key {
                    self.note_direct_peers(a, b);
                }
                let ev = SessionEvent::Message {
                    conv: Arc::from(conv),
                    seq,
                    frame: ByteString::from(frame),
                };
                self.deliver(&key, seq, ev, None);
            }
            BusMsg::Group {
                group,
                frame,
                extra,
                ..
            } => {
                self.cache_group(&group);
                let ev = SessionEvent::Frame(ByteString::from(frame));
                let mut to: HashSet<UserId> = group
                    .members
                    .iter()
                    .filter_map(|m| UserId::parse(m).ok())
                    .collect();
                to.extend(extra.and_then(|u| UserId::parse(&u).ok()));
                for u in &to {
                    self.push_user(u, &ev, None);
                }
            }
            BusMsg::Presence { node, user, online } => {
                if let Ok(u) = UserId::parse(&user) {
                    self.remote_presence(&node, u, online);
                }
            }
            BusMsg::Hello { .. } => {
                let users = self.online_users();
                if let Some(cl) = self.cluster.as_ref() {
                    cl.publish_all(&BusMsg::State {
                        node: cl.node(),
                        users,
                    });
                }
            }
            BusMsg::State { node, users } => {
                let now: HashSet<UserId> =
                    users.iter().filter_map(|u| UserId::parse(u).ok()).collect();
                let had: Vec<UserId> = cl_users(&self.cluster, &node);
                for u in had.into_iter().filter(|u| !now.contains(u)) {
                    self.remote_presence(&node, u, false);
                }
                for u in now {
                    self.remote_presence(&node, u, true);
                }
            }
            BusMsg::Beat { node, users } => {
                // A node's presence changes and beats travel in order on one
                // channel: a count that differs means something was missed.
                let Some(cl) = self.cluster.as_mut() else {
                    return;
                };
                let known = cl.nodes.get(&node).map_or(0, |n| n.users.len());
                let recent = cl.last_hello.is_some_and(|t| t.elapsed() < BEAT_EVERY * 2);
                if known != users && !recent {
                    log::info!("cluster: node {node} holds {users} users, {known} known here: asking for state");
                    cl.last_hello = Some(Instant::now());
                    cl.publish_all(&BusMsg::Hello { node: cl.node() });
                }
            }
            BusMsg::Bye { node } => {
                log::info!("cluster: node {node} left");
                self.drop_node(&node);
            }
            BusMsg::Disconnect {
                node,
                req,
                user,
                reason,
            } => {
                let closed = match UserId::parse(&user) {
                    Ok(u) => self.close_user(&u, &reason),
                    Err(_) => 0,
                };
                if let Some(cl) = self.cluster.as_ref() {
                    cl.bus.publish(
                        cl.bus.node_channel(&node),
                        &BusMsg::Closed {
                            node: cl.node(),
                            req,
                            closed,
                        },
                    );
                }
            }
            BusMsg::Closed { node, req, closed } => {
                let Some(cl) = self.cluster.as_mut() else {
                    return;
                };
                if let Some(p) = cl.disconnects.get_mut(&req) {
                    p.closed += closed;
                    p.waiting.remove(&node);
                    if p.waiting.is_empty() {
                        if let Some(tx) = p.tx.take() {
                            let _ = tx.send(());
                        }
                    }
                }
            }
        }
    }

    /// Ask the other nodes holding `user` to close their sessions; `None`
    /// standalone or when no other node holds the user.
    pub(super) fn cluster_disconnect(
        &mut self,
        user: &UserId,
        reason: &str,
    ) -> Option<(u64, oneshot::Receiver<()>)> {
        let cl = self.cluster.as_mut()?;
        let waiting: HashSet<String> = cl
            .nodes
            .iter()
            .filter(|(_, n)| n.users.contains(user))
            .map(|(id, _)| id.clone())
            .collect();
        cl.next_req += 1;
        let req = cl.next_req;
        cl.bus.publish(
            cl.bus.user_channel(user.as_str()),
            &BusMsg::Disconnect {
                node: cl.node(),
                req,
                user: user.to_string(),
                reason: reason.to_string(),
            },
        );
        if waiting.is_empty() {
            return None;
        }
        let (tx, rx) = oneshot::channel();
        cl.disconnects.insert(
            req,
            PendingDisconnect {
                waiting,
                closed: 0,
                tx: Some(tx),
            },
        );
        Some((req, rx))
    }

    /// What the other nodes closed for request `req` (forgetting it).
    pub(super) fn cluster_disconnect_done(&mut self, req: u64) -> usize {
        self.cluster
            .as_mut()
            .and_then(|cl| cl.disconnects.remove(&req))
            .map_or(0, |p| p.closed)
    }

    /// Graceful shutdown: tell the others this node's users are gone.
    pub(super) fn cluster_bye(&mut self) {
        if let Some(cl) = self.cluster.as_ref() {
            cl.publish_all(&BusMsg::Bye { node: cl.node() });
        }
    }
}

/// The conversation of an order state.
fn cl_key(cluster: &Option<ClusterState>, key: &Arc<str>) -> Option<ConvKey> {
    cluster
        .as_ref()
        .and_then(|c| c.order.get(key))
        .map(|o| o.key.clone())
}

/// The users the cluster state has for `node`.
fn cl_users(cluster: &Option<ClusterState>, node: &str) -> Vec<UserId> {
    cluster
        .as_ref()
        .and_then(|c| c.nodes.get(node))
        .map(|n| n.users.iter().cloned().collect())
        .unwrap_or_default()
}

/// Longest wait for a new user's subscriptions before the session goes on
/// without them (Redis slow or away: the backlog covers what is missed).
pub(super) const SUBSCRIBE_WAIT: Duration = Duration::from_secs(2);

impl Handler<BusEvent> for ChatServer {
    type Result = ();
    fn handle(&mut self, ev: BusEvent, ctx: &mut Context<Self>) {
        match ev {
            BusEvent::Up => {
                if let Some(cl) = self.cluster.as_mut() {
                    cl.up = true;
                }
                self.bus_up(ctx)
            }
            BusEvent::Down => {
                if let Some(cl) = self.cluster.as_mut() {
                    cl.up = false;
                }
            }
            BusEvent::Msg(m) => self.on_bus(m),
        }
    }
}
