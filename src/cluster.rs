//! The cluster bus: several chat-hub nodes joined through Redis pub/sub.
//!
//! The database stays the one source of truth; the bus carries only what is
//! live: stored messages to the nodes whose users need them, group changes,
//! presence, and requests such as "close this user's sessions". Channels:
//!
//! - `<prefix>:u:<user>`: a node subscribes while it holds a session of the
//!   user (direct messages, disconnect requests);
//! - `<prefix>:g:<group>`: while it holds a session of a member (group messages);
//! - `<prefix>:all`: every node (group changes, presence changes, beats);
//! - `<prefix>:n:<node>`: answers addressed to one node.
//!
//! A [`Bus`] is a handle to one driver task that owns the two Redis
//! connections (one subscribed, one publishing), publishes in order in
//! pipelined batches, and reconnects with backoff. While Redis is away,
//! publications are dropped (counted): nodes keep serving and storing, and
//! recipients get what they missed from the database (see docs/OPERATIONS.md).

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use crate::metrics::METRICS;
use crate::protocol::GroupView;

/// Publications queued towards Redis before new ones are dropped.
const MAX_QUEUED: usize = 100_000;
/// Publications sent to Redis in one pipeline.
const MAX_PIPELINE: usize = 512;
/// Longest wait for a Redis round trip before the connection counts as lost.
const REDIS_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a node says it is alive; it is presumed dead after [`NODE_EXPIRY`].
pub const BEAT_EVERY: Duration = Duration::from_secs(5);
pub const NODE_EXPIRY: Duration = Duration::from_secs(15);

/// What nodes say to each other (JSON on the channels above).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub enum BusMsg {
    /// A stored message: `frame` is the `message` frame as sessions get it.
    Msg {
        node: String,
        conv: String,
        seq: i64,
        frame: String,
    },
    /// A committed group change: the group as it is now and the event frame
    /// for members (and for `extra`, the user who left or was removed).
    Group {
        node: String,
        group: GroupView,
        frame: String,
        extra: Option<String>,
    },
    /// `user` got their first (`online`) or lost their last session on `node`.
    Presence {
        node: String,
        user: String,
        online: bool,
    },
    /// A node (re)joined: everyone answers with their `State`.
    Hello { node: String },
    /// Every user with a session on `node`.
    State { node: String, users: Vec<String> },
    /// `node` is alive and holds `users` users.
    Beat { node: String, users: usize },
    /// `node` is shutting down: its users are gone.
    Bye { node: String },
    /// Close every session of `user` (the server API on `node`, request `req`).
    Disconnect {
        node: String,
        req: u64,
        user: String,
        reason: String,
    },
    /// The answer to a `Disconnect`: `node` closed `closed` sessions.
    Closed {
        node: String,
        req: u64,
        closed: usize,
    },
}

impl BusMsg {
    /// The node that said it.
    pub fn node(&self) -> &str {
        match self {
            BusMsg::Msg { node, .. }
            | BusMsg::Group { node, .. }
            | BusMsg::Presence { node, .. }
            | BusMsg::Hello { node }
            | BusMsg::State { node, .. }
            | BusMsg::Beat { node, .. }
            | BusMsg::Bye { node }
            | BusMsg::Disconnect { node, .. }
            | BusMsg::Closed { node, .. } => node,
        }
    }
}

/// What the bus tells its owner (the ChatServer).
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub enum BusEvent {
    /// Connected (again) to Redis, with every subscription in place.
    Up,
    /// The connection to Redis was lost: nothing is published until `Up`.
    Down,
    /// A message from another node (a node's own messages are filtered out).
    Msg(BusMsg),
}

enum Cmd {
    Publish(String, String),
    /// Subscribe; `done` is answered once Redis confirmed (dropped if it could not).
    Subscribe(Vec<String>, Option<oneshot::Sender<()>>),
    Unsubscribe(Vec<String>),
}

/// A handle to the bus driver (cheap to clone).
#[derive(Clone)]
pub struct Bus {
    tx: mpsc::UnboundedSender<Cmd>,
    queued: Arc<AtomicUsize>,
    pub node: Arc<str>,
    prefix: Arc<str>,
}

impl Bus {
    /// Check the URL (nothing is connected yet).
    pub fn client(url: &str) -> Result<redis::Client, String> {
        redis::Client::open(url).map_err(|e| format!("CHAT_HUB_REDIS_URL: {e}"))
    }

    /// Start the driver on the current actix arbiter. It subscribes to the
    /// `all` channel and this node's own channel from the start, and keeps
    /// trying to reach Redis until it does.
    pub fn start(client: redis::Client, node: &str, prefix: &str, to: Recipient<BusEvent>) -> Bus {
        let (tx, rx) = mpsc::unbounded_channel();
        let bus = Bus {
            tx,
            queued: Arc::new(AtomicUsize::new(0)),
            node: Arc::from(node),
            prefix: Arc::from(prefix),
        };
        let fixed = vec![bus.all_channel(), bus.node_channel(node)];
        actix::spawn(drive(
            client,
            rx,
            to,
            fixed,
            bus.node.clone(),
            bus.queued.clone(),
        ));
        bus
    }

    pub fn user_channel(&self, user: &str) -> String {
        format!("{}:u:{user}", self.prefix)
    }

    pub fn group_channel(&self, group: &str) -> String {
        format!("{}:g:{group}", self.prefix)
    }

    pub fn all_channel(&self) -> String {
        format!("{}:all", self.prefix)
    }

    pub fn node_channel(&self, node: &str) -> String {
        format!("{}:n:{node}", self.prefix)
    }

    /// Queue `msg` for `channel`; dropped (and counted) if too much is queued.
    pub fn publish(&self, channel: String, msg: &BusMsg) {
        self.publish_on(vec![channel], msg);
    }

    /// Queue `msg` for each of `channels`, encoded once.
    pub fn publish_on(&self, channels: Vec<String>, msg: &BusMsg) {
        let payload = match serde_json::to_string(msg) {
            Ok(p) => p,
            Err(e) => {
                log::warn!("bus message not encoded: {e}");
                return;
            }
        };
        for channel in channels {
            if self.queued.load(Ordering::Relaxed) >= MAX_QUEUED {
                METRICS.bus_dropped.inc();
                continue;
            }
            self.queued.fetch_add(1, Ordering::Relaxed);
            if self
                .tx
                .send(Cmd::Publish(channel, payload.clone()))
                .is_err()
            {
                self.queued.fetch_sub(1, Ordering::Relaxed);
                METRICS.bus_dropped.inc();
            }
        }
    }

    pub fn subscribe(&self, channels: Vec<String>) {
        if !channels.is_empty() {
            let _ = self.tx.send(Cmd::Subscribe(channels, None));
        }
    }

    /// Subscribe; the receiver resolves once the subscriptions are in place
    /// (or fails at once while Redis is unreachable).
    pub fn subscribe_confirmed(&self, channels: Vec<String>) -> oneshot::Receiver<()> {
        let (tx, rx) = oneshot::channel();
        let _ = self.tx.send(Cmd::Subscribe(channels, Some(tx)));
        rx
    }

    pub fn unsubscribe(&self, channels: Vec<String>) {
        if !channels.is_empty() {
            let _ = self.tx.send(Cmd::Unsubscribe(channels));
        }
    }
}

/// Why a connection ended.
enum End {
    /// Every handle is gone: the server stopped.
    Stopped,
    Lost(String),
}

type PubConn = redis::aio::MultiplexedConnection;

async fn connect(
    client: &redis::Client,
    subs: &HashSet<String>,
) -> Result<(PubConn, redis::aio::PubSubSink, redis::aio::PubSubStream), String> {
    let pubsub = tokio::time::timeout(REDIS_TIMEOUT, client.get_async_pubsub())
        .await
        .map_err(|_| "timed out connecting".to_string())?
        .map_err(|e| e.to_string())?;
    let conn = tokio::time::timeout(REDIS_TIMEOUT, client.get_multiplexed_async_connection())
        .await
        .map_err(|_| "timed out connecting".to_string())?
        .map_err(|e| e.to_string())?;
    let (mut sink, stream) = pubsub.split();
    let all: Vec<&String> = subs.iter().collect();
    for chunk in all.chunks(1000) {
        tokio::time::timeout(REDIS_TIMEOUT, sink.subscribe(chunk))
            .await
            .map_err(|_| "timed out subscribing".to_string())?
            .map_err(|e| e.to_string())?;
    }
    Ok((conn, sink, stream))
}

async fn drive(
    client: redis::Client,
    mut rx: mpsc::UnboundedReceiver<Cmd>,
    to: Recipient<BusEvent>,
    fixed: Vec<String>,
    node: Arc<str>,
    queued: Arc<AtomicUsize>,
) {
    let mut subs: HashSet<String> = fixed.iter().cloned().collect();
    let fixed: HashSet<String> = fixed.into_iter().collect();
    let mut backoff = Duration::from_millis(100);
    let mut logged_down = false;
    loop {
        match connect(&client, &subs).await {
            Ok((conn, sink, stream)) => {
                log::info!("cluster bus: connected to Redis as node {node}");
                logged_down = false;
                backoff = Duration::from_millis(100);
                METRICS.bus_up.set(1);
                to.do_send(BusEvent::Up);
                let mut link = Link {
                    conn,
                    sink,
                    subs: &mut subs,
                    fixed: &fixed,
                    queued: &queued,
                };
                let end = link.serve(&mut rx, stream, &to, &node).await;
                METRICS.bus_up.set(0);
                match end {
                    End::Stopped => return,
                    End::Lost(why) => {
                        log::warn!("cluster bus: lost Redis ({why}); reconnecting");
                        to.do_send(BusEvent::Down);
                    }
                }
            }
            Err(why) => {
                if !logged_down {
                    log::warn!("cluster bus: cannot reach Redis ({why}); retrying");
                    logged_down = true;
                }
            }
        }
        // Wait before the next attempt, keeping the wanted subscriptions up
        // to date and dropping publications (live delivery only; everything
        // is in the database).
        let until = tokio::time::Instant::now() + backoff;
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(until) => break,
                cmd = rx.recv() => match cmd {
                    None => return,
                    Some(Cmd::Publish(..)) => {
                        queued.fetch_sub(1, Ordering::Relaxed);
                        METRICS.bus_dropped.inc();
                    }
                    Some(Cmd::Subscribe(v, _)) => subs.extend(v),
                    Some(Cmd::Unsubscribe(v)) => {
                        for c in v.iter().filter(|c| !fixed.contains(*c)) {
                            subs.remove(c);
                        }
                    }
                },
            }
        }
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

/// One live pair of connections to Redis.
struct Link<'a> {
    conn: PubConn,
    sink: redis::aio::PubSubSink,
    subs: &'a mut HashSet<String>,
    fixed: &'a HashSet<String>,
    queued: &'a AtomicUsize,
}

impl Link<'_> {
    async fn serve(
        &mut self,
        rx: &mut mpsc::UnboundedReceiver<Cmd>,
        mut stream: redis::aio::PubSubStream,
        to: &Recipient<BusEvent>,
        node: &str,
    ) -> End {
        loop {
            tokio::select! {
                cmd = rx.recv() => {
                    let Some(first) = cmd else { return End::Stopped };
                    if let Err(why) = self.run(first, rx).await {
                        return End::Lost(why);
                    }
                }
                msg = stream.next() => {
                    let Some(msg) = msg else {
                        return End::Lost("subscription connection closed".into());
                    };
                    match serde_json::from_slice::<BusMsg>(msg.get_payload_bytes()) {
                        Ok(m) if m.node() == node => {}
                        Ok(m) => {
                            METRICS.bus_received.inc();
                            to.do_send(BusEvent::Msg(m));
                        }
                        Err(e) => log::warn!(
                            "cluster bus: unreadable message on {}: {e}",
                            msg.get_channel_name()
                        ),
                    }
                }
            }
        }
    }

    /// Carry out `first` and whatever else is queued (up to a pipeline's
    /// worth), in order: publications go out as one pipeline.
    async fn run(
        &mut self,
        first: Cmd,
        rx: &mut mpsc::UnboundedReceiver<Cmd>,
    ) -> Result<(), String> {
        let mut pipe = redis::pipe();
        let mut n = 0usize;
        let mut next = Some(first);
        while let Some(cmd) = next.take() {
            match cmd {
                Cmd::Publish(channel, payload) => {
                    pipe.publish(channel, payload).ignore();
                    n += 1;
                }
                Cmd::Subscribe(v, done) => {
                    self.flush(&mut pipe, &mut n).await?;
                    let new: Vec<String> = v
                        .into_iter()
                        .filter(|c| self.subs.insert(c.clone()))
                        .collect();
                    if !new.is_empty() {
                        tokio::time::timeout(REDIS_TIMEOUT, self.sink.subscribe(&new))
                            .await
                            .map_err(|_| "timed out subscribing".to_string())?
                            .map_err(|e| e.to_string())?;
                    }
                    if let Some(done) = done {
                        let _ = done.send(());
                    }
                }
                Cmd::Unsubscribe(v) => {
                    self.flush(&mut pipe, &mut n).await?;
                    let gone: Vec<String> = v
                        .into_iter()
                        .filter(|c| !self.fixed.contains(c) && self.subs.remove(c))
                        .collect();
                    if !gone.is_empty() {
                        tokio::time::timeout(REDIS_TIMEOUT, self.sink.unsubscribe(&gone))
                            .await
                            .map_err(|_| "timed out unsubscribing".to_string())?
                            .map_err(|e| e.to_string())?;
                    }
                }
            }
            if n < MAX_PIPELINE {
                next = rx.try_recv().ok();
            }
        }
        self.flush(&mut pipe, &mut n).await
    }

    async fn flush(&mut self, pipe: &mut redis::Pipeline, n: &mut usize) -> Result<(), String> {
        if *n == 0 {
            return Ok(());
        }
        let count = std::mem::take(n);
        self.queued.fetch_sub(count, Ordering::Relaxed);
        let res = tokio::time::timeout(REDIS_TIMEOUT, pipe.query_async::<()>(&mut self.conn)).await;
        pipe.clear();
        match res {
            Ok(Ok(())) => {
                METRICS.bus_published.inc_by(count as u64);
                Ok(())
            }
            Ok(Err(e)) => {
                METRICS.bus_dropped.inc_by(count as u64);
                Err(e.to_string())
            }
            Err(_) => {
                METRICS.bus_dropped.inc_by(count as u64);
                Err("timed out publishing".into())
            }
        }
    }
}
