//! One simulated user: a task that connects, syncs, sends (paced by a window
//! or a schedule), receives, acknowledges, reconnects after a drop (resending
//! what was in flight with the same `client_id`), and counts everything.

use std::borrow::Cow;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{FutureExt, SinkExt, StreamExt};
use serde::Deserialize;
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;

use crate::stats::Bitmap;
use crate::sys::Target;

type Ws = WebSocketStream<TcpStream>;

/// Where the whole run is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Clients connect and sync; nobody sends yet.
    Connecting,
    /// Senders send (from this instant on).
    Sending(Instant),
    /// Flush acks, close, report.
    Finish,
}

/// How senders pace themselves.
#[derive(Clone, Copy, Debug)]
pub enum Pace {
    /// As fast as possible with at most this many sends awaiting `sent`.
    Window(usize),
    /// Open loop: one send every `interval` per sender (the total rate split
    /// evenly), each sender shifted by its own offset.
    Rate { interval: Duration },
}

/// What one user sends.
#[derive(Clone, Debug)]
pub struct SendPlan {
    /// The `to` object, already JSON: `{"user":"bob"}` or `{"group":"g1"}`.
    pub to_json: String,
    /// Messages to send at most.
    pub quota: u64,
    /// Recipients (other than the sender) expected to receive each message.
    pub fanout: u64,
    /// Offset of this sender's schedule in rate mode.
    pub offset: Duration,
}

/// One simulated user.
#[derive(Clone, Debug)]
pub struct Plan {
    pub user: String,
    pub token: String,
    pub send: Option<SendPlan>,
    /// Conversations this user must receive in full (for the loss count).
    pub expect: Vec<String>,
    /// A `group_create` frame to send once, after the first `synced`.
    pub create: Option<String>,
    /// Disconnect and come back now and then while senders send (soak).
    pub churn: bool,
    /// Start of this user's client ids (`<cid_prefix><n>`).
    pub cid_prefix: String,
    /// Source address to connect from (spreads ephemeral ports).
    pub source: Option<IpAddr>,
    /// Which of the run's servers (`Shared::targets`) this user connects to.
    pub node: usize,
    pub seed: u64,
}

/// Settings and counters shared by every client of a run.
pub struct Shared {
    /// The servers (nodes of one cluster, or one server); never empty.
    pub targets: Vec<Target>,
    pub ws_config: WebSocketConfig,
    pub pace: Pace,
    pub duration: Duration,
    pub deadline: Instant,
    pub ack_every: Duration,
    /// Mean time between a churning client's disconnects, and how long it stays away.
    pub churn_every: Duration,
    pub churn_away: (Duration, Duration),
    pub body_pad: String,
    pub connect_sem: Arc<Semaphore>,
    pub ready: AtomicUsize,
    pub groups_created: AtomicUsize,
    pub senders_done: AtomicUsize,
    pub sent_ok: AtomicU64,
    pub expected: AtomicU64,
    pub delivered: AtomicU64,
    pub inflight: AtomicU64,
    pub stop_sending: AtomicBool,
    /// A client that cannot go on (e.g. the server refuses its token).
    pub fatal: Mutex<Option<String>>,
    /// Anchor of the generator's clock: body times are microseconds on it.
    pub epoch: Instant,
    pub epoch_unix_us: u64,
}

impl Shared {
    pub fn us(&self, at: Instant) -> u64 {
        self.epoch_unix_us + at.saturating_duration_since(self.epoch).as_micros() as u64
    }
    fn set_fatal(&self, why: String) {
        let mut f = self.fatal.lock().unwrap_or_else(|e| e.into_inner());
        f.get_or_insert(why);
    }
}

/// What a client saw, merged by the scenario at the end.
#[derive(Debug, Default)]
pub struct ClientResult {
    pub expect: Vec<String>,
    /// Per conversation: the seqs this user has (received, or sent itself).
    pub marks: HashMap<String, Bitmap>,
    /// The conversation this user sent to and the seqs it got `sent` for.
    pub sent_conv: Option<String>,
    pub sent_bits: Bitmap,
    pub sent: u64,
    pub send_errors: u64,
    pub skipped: u64,
    pub unconfirmed: u64,
    pub delivered: u64,
    pub backlog_delivered: u64,
    pub duplicates: u64,
    pub repeated_on_connection: u64,
    pub out_of_order: u64,
    pub connects: u64,
    pub connect_errors: u64,
    pub unexpected_closes: u64,
    pub churns: u64,
    pub errors: HashMap<String, u64>,
    /// Send (scheduled) to receipt, live deliveries only, microseconds.
    pub latency_us: Vec<u32>,
    /// Send to `sent`, microseconds.
    pub sent_latency_us: Vec<u32>,
    /// Rate mode: how late the generator sent against its schedule.
    pub lag_us: Vec<u32>,
    /// Connect start to `synced`, microseconds, per connection.
    pub connect_us: Vec<u32>,
    /// First connection: start to `welcome`, start to `synced`, messages before `synced`.
    pub first_welcome: Option<Duration>,
    pub first_synced: Option<Duration>,
    pub first_backlog: u64,
    pub last_delivery: Option<Instant>,
    pub last_sent: Option<Instant>,
}

#[derive(Default)]
struct ConvTrack {
    marks: Bitmap,
    /// Every seq up to here is in `marks`.
    hwm: u64,
    acked: u64,
    received: u64,
    /// Highest seq seen on the current connection.
    last_conn_seq: u64,
}

impl ConvTrack {
    fn mark(&mut self, seq: u64) -> bool {
        let new = self.marks.set(seq);
        while self.marks.get(self.hwm + 1) {
            self.hwm += 1;
        }
        new
    }
}

struct Inflight {
    /// Time written in the body (scheduled send time in rate mode).
    t_us: u64,
    /// When it was (last) written to the socket.
    at: Instant,
}

/// Frames from the server; only the fields the generator needs.
#[derive(Deserialize)]
struct In<'a> {
    #[serde(rename = "type", borrow)]
    ty: Cow<'a, str>,
    #[serde(borrow, default)]
    conv: Option<Cow<'a, str>>,
    #[serde(default)]
    seq: Option<u64>,
    #[serde(borrow, default)]
    body: Option<Cow<'a, str>>,
    #[serde(rename = "ref", borrow, default)]
    r#ref: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    code: Option<Cow<'a, str>>,
}

/// The number after `"key":` in a small JSON object (the message body).
fn field_u64(s: &str, key: &str) -> Option<u64> {
    let i = s.find(key)? + key.len();
    let digits: &str = &s[i..];
    let end = digits
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(digits.len());
    digits[..end].parse().ok()
}

enum End {
    Finish,
    Churn,
    Dropped(String),
}

pub struct Client {
    plan: Plan,
    sh: Arc<Shared>,
    phase: watch::Receiver<Phase>,
    convs: HashMap<Box<str>, ConvTrack>,
    inflight: HashMap<u64, Inflight>,
    next_i: u64,
    sending_done: bool,
    next_due: Option<Instant>,
    k: u64,
    synced_once: bool,
    out: Vec<String>,
    rng: u64,
    permit: Option<OwnedSemaphorePermit>,
    conn_started: Instant,
    res: ClientResult,
}

const MAX_INFLIGHT_RATE: usize = 20_000;

impl Client {
    pub fn new(plan: Plan, sh: Arc<Shared>, phase: watch::Receiver<Phase>) -> Self {
        let rng = plan.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let res = ClientResult {
            expect: plan.expect.clone(),
            ..Default::default()
        };
        Client {
            plan,
            sh,
            phase,
            convs: HashMap::new(),
            inflight: HashMap::new(),
            next_i: 0,
            sending_done: false,
            next_due: None,
            k: 0,
            synced_once: false,
            out: Vec::new(),
            rng,
            permit: None,
            conn_started: Instant::now(),
            res,
        }
    }

    fn random(&mut self) -> f64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        (self.rng >> 11) as f64 / (1u64 << 53) as f64
    }

    fn finishing(&self) -> bool {
        *self.phase.borrow() == Phase::Finish || Instant::now() >= self.sh.deadline
    }

    /// Run until the run finishes (or the deadline); return what was seen.
    pub async fn run(mut self) -> ClientResult {
        loop {
            if self.finishing() {
                break;
            }
            if !self.synced_once && self.permit.is_none() {
                // Bound concurrent connects (and the server's backlog loads) at start-up.
                match self.sh.connect_sem.clone().acquire_owned().await {
                    Ok(p) => self.permit = Some(p),
                    Err(_) => break,
                }
            }
            self.conn_started = Instant::now();
            let ws = match connect(&self.sh, &self.plan).await {
                Ok(ws) => ws,
                Err(e) => {
                    self.res.connect_errors += 1;
                    if e.starts_with("HTTP") {
                        self.sh
                            .set_fatal(format!("{}: connect refused: {e}", self.plan.user));
                        break;
                    }
                    *self.res.errors.entry(format!("connect: {e}")).or_default() += 1;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            };
            self.res.connects += 1;
            let mut ws = ws;
            match self.session(&mut ws).await {
                End::Finish => break,
                End::Churn => {
                    self.res.churns += 1;
                    let (lo, hi) = self.sh.churn_away;
                    let away = lo + (hi.saturating_sub(lo)).mul_f64(self.random());
                    tokio::time::sleep_until((Instant::now() + away).min(self.sh.deadline).into())
                        .await;
                }
                End::Dropped(why) => {
                    if self.finishing() {
                        break;
                    }
                    self.res.unexpected_closes += 1;
                    *self.res.errors.entry(why).or_default() += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        self.permit = None;
        self.finish_result()
    }

    fn finish_result(mut self) -> ClientResult {
        if self.plan.send.is_some() && !self.sending_done {
            self.sh.senders_done.fetch_add(1, Relaxed);
        }
        self.res.unconfirmed = self.inflight.len() as u64;
        self.sh
            .inflight
            .fetch_sub(self.inflight.len() as u64, Relaxed);
        for (k, c) in self.convs.drain() {
            self.res.marks.insert(k.into(), c.marks);
        }
        self.res
    }

    async fn session(&mut self, ws: &mut Ws) -> End {
        for c in self.convs.values_mut() {
            c.last_conn_seq = 0;
        }
        let mut in_sync = true;
        let mut backlog = 0u64;
        // Whatever had no `sent` on the last connection goes again, same client_id.
        let mut again: Vec<u64> = self.inflight.keys().copied().collect();
        again.sort_unstable();
        let now = Instant::now();
        for i in again {
            if let Some(f) = self.inflight.get_mut(&i) {
                f.at = now;
                let t_us = f.t_us;
                let frame = self.frame(i, t_us);
                self.out.push(frame);
            }
        }
        let mut next_ack = Instant::now() + self.sh.ack_every;
        let mut churn_at: Option<Instant> = None;
        loop {
            let phase = *self.phase.borrow();
            if phase == Phase::Finish || Instant::now() >= self.sh.deadline {
                self.queue_acks();
                let _ = self.flush_out(ws).await;
                return close(ws).await;
            }
            if let Phase::Sending(start) = phase {
                if self.plan.churn && churn_at.is_none() {
                    let mean = self.sh.churn_every.as_secs_f64();
                    let wait = -mean * (1.0 - self.random()).ln();
                    churn_at = Some(Instant::now() + Duration::from_secs_f64(wait.min(mean * 5.0)));
                }
                if !in_sync {
                    self.pump(start);
                }
            }
            if let Err(e) = self.flush_out(ws).await {
                return End::Dropped(format!("write: {e}"));
            }
            let mut wake = next_ack.min(self.sh.deadline);
            if let Some(d) = self.next_due.filter(|_| !self.sending_done && !in_sync) {
                wake = wake.min(d);
            }
            if let Some(c) = churn_at {
                wake = wake.min(c);
            }
            tokio::select! {
                m = ws.next() => {
                    let mut m = m;
                    let mut n = 0;
                    loop {
                        match m {
                            None => return End::Dropped("closed by server (no close frame)".into()),
                            Some(Err(e)) => return End::Dropped(format!("read: {}", short(&e))),
                            Some(Ok(msg)) => {
                                if let Some(end) = self.on_message(msg, &mut in_sync, &mut backlog) {
                                    return end;
                                }
                            }
                        }
                        n += 1;
                        if n >= 256 {
                            break;
                        }
                        match ws.next().now_or_never() {
                            Some(next) => m = next,
                            None => break,
                        }
                    }
                }
                _ = tokio::time::sleep_until(wake.into()) => {}
                r = self.phase.changed() => {
                    if r.is_err() {
                        return close(ws).await;
                    }
                }
            }
            let now = Instant::now();
            if now >= next_ack {
                self.queue_acks();
                next_ack = now + self.sh.ack_every;
            }
            if churn_at.is_some_and(|c| now >= c) && !in_sync {
                self.queue_acks();
                let _ = self.flush_out(ws).await;
                let _ = close(ws).await;
                return End::Churn;
            }
        }
    }

    async fn flush_out(&mut self, ws: &mut Ws) -> Result<(), WsError> {
        if self.out.is_empty() {
            return Ok(());
        }
        for f in self.out.drain(..) {
            ws.feed(Message::text(f)).await?;
        }
        ws.flush().await
    }

    fn queue_acks(&mut self) {
        for (conv, c) in self.convs.iter_mut() {
            if c.received > 0 && c.hwm > c.acked {
                c.acked = c.hwm;
                self.out.push(format!(
                    r#"{{"type":"ack","conv":"{conv}","seq":{}}}"#,
                    c.hwm
                ));
            }
        }
    }

    fn frame(&self, i: u64, t_us: u64) -> String {
        let to = self.plan.send.as_ref().map_or("{}", |s| s.to_json.as_str());
        let pad = &self.sh.body_pad;
        let cid = &self.plan.cid_prefix;
        format!(
            r#"{{"type":"send","to":{to},"body":"{{\"t\":{t_us},\"i\":{i}{pad}}}","client_id":"{cid}{i}","ref":"s{i}"}}"#
        )
    }

    fn emit(&mut self, t_us: u64, now: Instant) {
        let i = self.next_i;
        self.next_i += 1;
        let f = self.frame(i, t_us);
        self.out.push(f);
        self.inflight.insert(i, Inflight { t_us, at: now });
        self.sh.inflight.fetch_add(1, Relaxed);
    }

    /// Queue the sends that are due now.
    fn pump(&mut self, start: Instant) {
        let Some(sp) = self.plan.send.as_ref() else {
            return;
        };
        if self.sending_done {
            return;
        }
        let (quota, offset) = (sp.quota, sp.offset);
        let now = Instant::now();
        let end = start + self.sh.duration;
        if self.next_i >= quota || now >= end || self.sh.stop_sending.load(Relaxed) {
            self.sending_done = true;
            self.sh.senders_done.fetch_add(1, Relaxed);
            return;
        }
        match self.sh.pace {
            Pace::Window(w) => {
                let t = self.sh.us(now);
                while self.inflight.len() < w && self.next_i < quota {
                    self.emit(t, now);
                }
            }
            Pace::Rate { interval } => {
                let mut due = *self.next_due.get_or_insert(start + offset);
                while due <= now && self.next_i < quota && due < end {
                    if self.inflight.len() >= MAX_INFLIGHT_RATE {
                        self.res.skipped += 1;
                    } else {
                        self.res
                            .lag_us
                            .push(now.duration_since(due).as_micros().min(u32::MAX as u128) as u32);
                        let t = self.sh.us(due);
                        self.emit(t, now);
                    }
                    self.k += 1;
                    due = start + offset + interval.mul_f64(self.k as f64);
                }
                self.next_due = Some(due);
                if due >= end {
                    // Nothing more is due before the end: done once the last is out.
                    self.sending_done = true;
                    self.sh.senders_done.fetch_add(1, Relaxed);
                }
            }
        }
    }

    /// Handle one frame; `Some` ends the session.
    fn on_message(&mut self, msg: Message, in_sync: &mut bool, backlog: &mut u64) -> Option<End> {
        let text = match msg {
            Message::Text(t) => t,
            Message::Close(c) => {
                let why = match c {
                    Some(c) => format!("closed by server: {} {}", u16::from(c.code), c.reason),
                    None => "closed by server".into(),
                };
                return Some(End::Dropped(why));
            }
            _ => return None,
        };
        let f: In = match serde_json::from_str(text.as_str()) {
            Ok(f) => f,
            Err(_) => {
                *self
                    .res
                    .errors
                    .entry("unparsable frame".into())
                    .or_default() += 1;
                return None;
            }
        };
        let now = Instant::now();
        match &*f.ty {
            "message" => {
                let (Some(conv), Some(seq)) = (f.conv.as_deref(), f.seq) else {
                    *self
                        .res
                        .errors
                        .entry("message without conv/seq".into())
                        .or_default() += 1;
                    return None;
                };
                let c = match self.convs.get_mut(conv) {
                    Some(c) => c,
                    None => self.convs.entry(conv.into()).or_default(),
                };
                let behind = seq <= c.last_conn_seq;
                c.last_conn_seq = c.last_conn_seq.max(seq);
                if !c.mark(seq) {
                    // Allowed by the protocol (at least once); a copy that comes
                    // after a higher seq on the same connection is counted too.
                    self.res.duplicates += 1;
                    if behind {
                        self.res.repeated_on_connection += 1;
                    }
                    return None;
                }
                if behind {
                    // A message this user never had, after a higher seq: a real ordering fault.
                    self.res.out_of_order += 1;
                }
                c.received += 1;
                self.res.delivered += 1;
                self.sh.delivered.fetch_add(1, Relaxed);
                self.res.last_delivery = Some(now);
                if *in_sync {
                    *backlog += 1;
                    self.res.backlog_delivered += 1;
                } else if let Some(t) = f.body.as_deref().and_then(|b| field_u64(b, "\"t\":")) {
                    let lat = self.sh.us(now).saturating_sub(t);
                    self.res.latency_us.push(lat.min(u32::MAX as u64) as u32);
                }
            }
            "sent" => {
                let i = f
                    .r#ref
                    .as_deref()
                    .and_then(|r| r.strip_prefix('s'))
                    .and_then(|r| r.parse::<u64>().ok());
                let (Some(i), Some(conv), Some(seq)) = (i, f.conv.as_deref(), f.seq) else {
                    return None;
                };
                let Some(fl) = self.inflight.remove(&i) else {
                    return None; // a second `sent` for a resent message
                };
                self.sh.inflight.fetch_sub(1, Relaxed);
                self.res.sent += 1;
                self.sh.sent_ok.fetch_add(1, Relaxed);
                let fanout = self.plan.send.as_ref().map_or(0, |s| s.fanout);
                self.sh.expected.fetch_add(fanout, Relaxed);
                self.res.sent_bits.set(seq);
                if self.res.sent_conv.is_none() {
                    self.res.sent_conv = Some(conv.to_string());
                }
                let c = match self.convs.get_mut(conv) {
                    Some(c) => c,
                    None => self.convs.entry(conv.into()).or_default(),
                };
                c.mark(seq);
                let lat = now.duration_since(fl.at).as_micros();
                self.res
                    .sent_latency_us
                    .push(lat.min(u32::MAX as u128) as u32);
                self.res.last_sent = Some(now);
            }
            "synced" => {
                *in_sync = false;
                self.res.connect_us.push(
                    self.conn_started
                        .elapsed()
                        .as_micros()
                        .min(u32::MAX as u128) as u32,
                );
                if !self.synced_once {
                    self.synced_once = true;
                    self.res.first_synced = Some(self.conn_started.elapsed());
                    self.res.first_backlog = *backlog;
                    self.permit = None;
                    self.sh.ready.fetch_add(1, Relaxed);
                    if let Some(c) = self.plan.create.take() {
                        self.out.push(c);
                    }
                }
            }
            "welcome" if !self.synced_once => {
                self.res.first_welcome = Some(self.conn_started.elapsed());
            }
            "group" if f.r#ref.as_deref() == Some("create") => {
                self.sh.groups_created.fetch_add(1, Relaxed);
            }
            "error" => {
                let code = f.code.as_deref().unwrap_or("?").to_string();
                *self.res.errors.entry(format!("error: {code}")).or_default() += 1;
                let i = f
                    .r#ref
                    .as_deref()
                    .and_then(|r| r.strip_prefix('s'))
                    .and_then(|r| r.parse::<u64>().ok());
                if let Some(i) = i {
                    if self.inflight.remove(&i).is_some() {
                        self.sh.inflight.fetch_sub(1, Relaxed);
                        self.res.send_errors += 1;
                    }
                }
                if f.r#ref.as_deref() == Some("create") {
                    self.sh
                        .set_fatal(format!("{}: group_create refused: {code}", self.plan.user));
                }
            }
            _ => {}
        }
        None
    }
}

fn short(e: &WsError) -> String {
    let s = e.to_string();
    s.chars().take(80).collect()
}

/// Send a close frame and wait (briefly) for the server's.
async fn close(ws: &mut Ws) -> End {
    let _ = ws.close(None).await;
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
    End::Finish
}

async fn connect(sh: &Shared, plan: &Plan) -> Result<Ws, String> {
    let target = &sh.targets[plan.node % sh.targets.len()];
    let sock = match target.addr {
        SocketAddr::V4(_) => TcpSocket::new_v4(),
        SocketAddr::V6(_) => TcpSocket::new_v6(),
    }
    .map_err(|e| format!("socket: {e}"))?;
    if let Some(ip) = plan.source {
        sock.bind(SocketAddr::new(ip, 0))
            .map_err(|e| format!("bind {ip}: {e}"))?;
    }
    let stream = tokio::time::timeout(Duration::from_secs(10), sock.connect(target.addr))
        .await
        .map_err(|_| "tcp connect timed out".to_string())?
        .map_err(|e| format!("tcp connect: {e}"))?;
    let _ = stream.set_nodelay(true);
    let url = format!("{}?token={}", target.url, plan.token);
    let (ws, _) = tokio::time::timeout(
        Duration::from_secs(20),
        tokio_tungstenite::client_async_with_config(url, stream, Some(sh.ws_config)),
    )
    .await
    .map_err(|_| "websocket handshake timed out".to_string())?
    .map_err(|e| match e {
        WsError::Http(r) => format!("HTTP {}", r.status()),
        e => format!("handshake: {}", short(&e)),
    })?;
    Ok(ws)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_fields() {
        assert_eq!(field_u64(r#"{"t":123,"i":4}"#, "\"t\":"), Some(123));
        assert_eq!(field_u64(r#"{"t":123,"i":4}"#, "\"i\":"), Some(4));
        assert_eq!(field_u64(r#"{"x":1}"#, "\"t\":"), None);
    }

    #[test]
    fn parses_server_frames() {
        let f: In = serde_json::from_str(
            r#"{"type":"message","conv":"dm:a:b","seq":42,"from":"a","to":{"user":"b"},"body":"{\"t\":5,\"i\":1}","ts":1,"client_id":"c1"}"#,
        )
        .unwrap();
        assert_eq!(f.ty, "message");
        assert_eq!(f.seq, Some(42));
        assert_eq!(f.body.as_deref(), Some(r#"{"t":5,"i":1}"#));
    }

    #[test]
    fn conv_track_high_water_mark() {
        let mut c = ConvTrack::default();
        c.mark(2);
        assert_eq!(c.hwm, 0);
        c.mark(1);
        assert_eq!(c.hwm, 2);
        assert!(!c.mark(2));
    }
}
