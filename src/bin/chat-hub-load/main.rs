//! `chat-hub-load`: a load generator that speaks chat-hub's wire protocol like
//! real clients (JWT, welcome/backlog/synced, send/sent, message, cumulative
//! acks, reconnect with idempotent resend) and measures throughput, latency,
//! losses, duplicates and ordering. Prints ONE JSON line on stdout at the end;
//! progress goes to stderr. Exits 1 when anything was lost, out of order,
//! refused, or the run did not complete; 2 on a usage error.
//!
//! `--url` may list several nodes of one cluster, comma-separated: clients are
//! spread over them (direct: each pair's receiver on the node after its
//! sender's; group: members round-robin), and `--server-pid` may list their
//! pids (memory and CPU summed).
//!
//! Run the server with the per-user rate limit raised, e.g.
//! `CHAT_HUB_RATE_PER_SEC=1000000 CHAT_HUB_RATE_BURST=1000000 chat-hub`.
//! See docs/PERFORMANCE.md.

mod client;
mod stats;
mod sys;

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::{value_parser, Arg, ArgAction, ArgMatches, Command};
use serde_json::{json, Map, Value};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use chat_hub::auth::TokenKeys;
use chat_hub::ids::UserId;
use client::{Client, ClientResult, Pace, Phase, Plan, SendPlan, Shared};
use stats::{summary_ms, Bitmap};

fn cli() -> Command {
    let g = |a: Arg| a.global(true);
    Command::new("chat-hub-load")
        .about("Load generator for chat-hub: real protocol clients; one JSON line of figures at the end")
        .after_help(
            "Run the server with the rate limit raised: CHAT_HUB_RATE_PER_SEC=1000000 CHAT_HUB_RATE_BURST=1000000.\n\
             Many connections need `ulimit -n` raised for the server and for this program.\n\
             Exit status: 0 all delivered in order; 1 loss, disorder, refused sends or an incomplete run; 2 usage.",
        )
        .subcommand_required(true)
        .arg(g(Arg::new("url").long("url").value_name("URL[,URL...]").default_value("ws://127.0.0.1:8080/ws").help("server WebSocket URL (ws:// only); several, comma-separated, for the nodes of one cluster: connections are spread over them (direct: sender and receiver on different nodes; group: members round-robin)")))
        .arg(g(Arg::new("secret").long("secret").help("the server's HS256 token secret [default: $CHAT_HUB_JWT_SECRET]")))
        .arg(g(Arg::new("secret_file").long("secret-file").value_name("PATH").help("read the secret from this file (SQLite: <database>.secret)")))
        .arg(g(Arg::new("allow_remote").long("allow-remote").action(ArgAction::SetTrue).help("allow a target that is not a loopback address")))
        .arg(g(Arg::new("rate").long("rate").value_name("MSG/S").value_parser(value_parser!(f64)).help("open loop: total send rate over all senders (default: as fast as the window allows)")))
        .arg(g(Arg::new("window").long("window").value_name("N").value_parser(value_parser!(u64).range(1..=100_000)).help("sends awaiting `sent` per sender, as-fast-as-possible mode [default 32; group 8]")))
        .arg(g(Arg::new("messages").long("messages").value_name("N").value_parser(value_parser!(u64).range(1..)).help("messages to send in all (split over the senders)")))
        .arg(g(Arg::new("duration").long("duration").value_name("SECS").value_parser(value_parser!(f64)).help("longest sending phase")))
        .arg(g(Arg::new("drain").long("drain").value_name("SECS").value_parser(value_parser!(f64)).help("longest wait for deliveries after sending [default 15]")))
        .arg(g(Arg::new("deadline").long("deadline").value_name("SECS").value_parser(value_parser!(f64)).help("hard limit for the whole run [default: computed from the others]")))
        .arg(g(Arg::new("body_bytes").long("body-bytes").value_name("N").value_parser(value_parser!(usize)).help("pad message bodies to about N bytes [default: ~30, just the timestamp]")))
        .arg(g(Arg::new("ack_ms").long("ack-ms").value_name("MS").value_parser(value_parser!(u64).range(1..)).default_value("100").help("send cumulative acks this often (per connection, when something new arrived)")))
        .arg(g(Arg::new("server_pid").long("server-pid").value_name("PID[,PID...]").help("read the server's memory and CPU from /proc/<PID> (several, comma-separated: the sum over the nodes)")))
        .arg(g(Arg::new("sample_secs").long("sample-secs").value_name("SECS").value_parser(value_parser!(f64)).default_value("10").help("sample the server's RSS this often")))
        .arg(g(Arg::new("connect_concurrency").long("connect-concurrency").value_name("N").value_parser(value_parser!(usize)).default_value("200").help("connections being opened at once at start-up")))
        .arg(g(Arg::new("source_addrs").long("source-addrs").value_name("N").value_parser(value_parser!(u8).range(1..=250)).default_value("1").help("connect from 127.0.0.1 .. 127.0.0.N (more ephemeral ports)")))
        .arg(g(Arg::new("threads").long("threads").value_name("N").value_parser(value_parser!(usize)).default_value("2").help("generator worker threads")))
        .arg(g(Arg::new("prefix").long("prefix").value_name("P").help("user and group id prefix [default: unique per run]")))
        .arg(g(Arg::new("counter_client_ids").long("counter-client-ids").action(ArgAction::SetTrue).help("client ids c0, c1, ... for every sender (as in the protocol's examples) instead of unique per user")))
        .arg(g(Arg::new("quick").long("quick").action(ArgAction::SetTrue).help("small sizes, strict checks (CI smoke test)")))
        .subcommand(
            Command::new("direct")
                .about("P sender/receiver pairs; each sender sends to its receiver")
                .arg(Arg::new("pairs").long("pairs").value_parser(value_parser!(usize)).help("pairs [default 50; quick 4]")),
        )
        .subcommand(
            Command::new("group")
                .about("G groups of K members, everyone sending to their group")
                .arg(Arg::new("groups").long("groups").value_parser(value_parser!(usize)).help("groups [default 10; quick 2]"))
                .arg(Arg::new("members").long("members").value_parser(value_parser!(usize)).help("members per group [default 50; quick 5]")),
        )
        .subcommand(
            Command::new("backlog")
                .about("N messages stored for an offline user, then time from connect to `synced`")
                .arg(Arg::new("backlog").long("backlog").value_parser(value_parser!(u64)).help("messages in the backlog [default 10000; quick 300]"))
                .arg(Arg::new("repeats").long("repeats").value_parser(value_parser!(usize)).help("independent repetitions [default 3; quick 1]")),
        )
        .subcommand(
            Command::new("connections")
                .about("C idle authenticated connections; server memory per connection")
                .arg(Arg::new("connections").long("connections").value_parser(value_parser!(usize)).help("connections [default 1000; quick 50]"))
                .arg(Arg::new("hold").long("hold").value_parser(value_parser!(f64)).help("seconds to hold them [default 15; quick 1]")),
        )
        .subcommand(
            Command::new("soak")
                .about("direct pairs at a fixed rate while receivers disconnect and come back")
                .arg(Arg::new("pairs").long("pairs").value_parser(value_parser!(usize)).help("pairs [default 50; quick 4]"))
                .arg(Arg::new("churn").long("churn").value_parser(value_parser!(f64)).help("receiver reconnects per second, in all [default 2]")),
        )
}

/// Options every scenario shares.
struct Common {
    /// The servers to connect to (the nodes of one cluster, or one server).
    targets: Vec<sys::Target>,
    keys: TokenKeys,
    window: Option<u64>,
    rate: Option<f64>,
    messages: Option<u64>,
    duration: Option<f64>,
    drain: f64,
    deadline: Option<f64>,
    body_pad: String,
    ack_ms: u64,
    /// Server processes to read memory and CPU of (summed); empty: none.
    server_pids: Vec<u32>,
    sample_secs: f64,
    connect_concurrency: usize,
    source_addrs: u8,
    prefix: String,
    quick: bool,
    counter_cids: bool,
    params: Map<String, Value>,
}

impl Common {
    fn from(m: &ArgMatches) -> Result<Common, String> {
        let url = m.get_one::<String>("url").cloned().unwrap_or_default();
        let targets = sys::parse_targets(&url)?;
        let allow_remote = m.get_flag("allow_remote");
        for target in &targets {
            if !target.loopback && !allow_remote {
                return Err(format!(
                    "refusing to load {} ({}): not a loopback address; pass --allow-remote if you really mean it",
                    target.url, target.addr
                ));
            }
        }
        let server_pids = match m.get_one::<String>("server_pid") {
            Some(s) => sys::parse_pids(s)?,
            None => Vec::new(),
        };
        let secret = match (m.get_one::<String>("secret_file"), m.get_one::<String>("secret")) {
            (Some(path), _) => std::fs::read_to_string(path)
                .map_err(|e| format!("--secret-file {path}: {e}"))?
                .trim()
                .to_string(),
            (None, Some(s)) => s.clone(),
            (None, None) if std::env::var("CHAT_HUB_JWT_SECRET").is_ok_and(|s| !s.is_empty()) => {
                std::env::var("CHAT_HUB_JWT_SECRET").unwrap_or_default()
            }
            (None, None) => {
                return Err(
                    "no token secret: give --secret, CHAT_HUB_JWT_SECRET or --secret-file <database>.secret".into(),
                )
            }
        };
        if secret.is_empty() {
            return Err("the token secret is empty".into());
        }
        let body_bytes = m.get_one::<usize>("body_bytes").copied().unwrap_or(0);
        let body_pad = if body_bytes > 40 {
            format!(r#",\"p\":\"{}\""#, "x".repeat(body_bytes - 40))
        } else {
            String::new()
        };
        let prefix = match m.get_one::<String>("prefix") {
            Some(p) => p.clone(),
            None => {
                let now = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_millis();
                format!(
                    "L{}-",
                    base36(now as u64 ^ ((std::process::id() as u64) << 40))
                )
            }
        };
        // Validate the longest id we will make.
        UserId::parse(&format!("{prefix}g999m9999")).map_err(|e| format!("--prefix: {e}"))?;
        let rate = m.get_one::<f64>("rate").copied();
        if rate.is_some_and(|r| !(r > 0.0 && r.is_finite())) {
            return Err("--rate must be a positive number".into());
        }
        for k in ["duration", "drain", "deadline", "sample_secs"] {
            if m.get_one::<f64>(k)
                .is_some_and(|v| !(*v > 0.0 && v.is_finite()))
            {
                return Err(format!(
                    "--{} must be a positive number",
                    k.replace('_', "-")
                ));
            }
        }
        let mut params = Map::new();
        let urls: Vec<&str> = targets.iter().map(|t| t.url.as_str()).collect();
        params.insert("url".into(), json!(urls.join(",")));
        params.insert("urls".into(), json!(urls));
        params.insert("nodes".into(), json!(targets.len()));
        params.insert("prefix".into(), json!(prefix));
        params.insert("quick".into(), json!(m.get_flag("quick")));
        params.insert("body_bytes".into(), json!(body_bytes));
        params.insert("ack_ms".into(), json!(m.get_one::<u64>("ack_ms")));
        params.insert(
            "client_ids".into(),
            json!(if m.get_flag("counter_client_ids") {
                "counter"
            } else {
                "unique"
            }),
        );
        Ok(Common {
            targets,
            keys: TokenKeys::new(&secret),
            window: m.get_one::<u64>("window").copied(),
            rate,
            messages: m.get_one::<u64>("messages").copied(),
            duration: m.get_one::<f64>("duration").copied(),
            drain: m.get_one::<f64>("drain").copied().unwrap_or(15.0),
            deadline: m.get_one::<f64>("deadline").copied(),
            body_pad,
            ack_ms: m.get_one::<u64>("ack_ms").copied().unwrap_or(100),
            server_pids,
            sample_secs: m.get_one::<f64>("sample_secs").copied().unwrap_or(10.0),
            connect_concurrency: m
                .get_one::<usize>("connect_concurrency")
                .copied()
                .unwrap_or(200)
                .max(1),
            source_addrs: m.get_one::<u8>("source_addrs").copied().unwrap_or(1),
            prefix,
            quick: m.get_flag("quick"),
            counter_cids: m.get_flag("counter_client_ids"),
            params,
        })
    }

    fn token(&self, user: &str) -> Result<String, String> {
        let id = UserId::parse(user)?;
        self.keys.mint(&id, 24 * 3600)
    }

    fn source(&self, i: usize) -> Option<IpAddr> {
        (self.source_addrs > 1 && self.targets.iter().all(|t| t.addr.is_ipv4())).then(|| {
            IpAddr::V4(Ipv4Addr::new(
                127,
                0,
                0,
                1 + (i % self.source_addrs as usize) as u8,
            ))
        })
    }

    /// The node the `i`-th user of a spread connects to (round-robin).
    fn node(&self, i: usize) -> usize {
        i % self.targets.len()
    }

    /// A user connecting to the first node (scenarios set `node` to spread them).
    fn plan(&self, user: String, idx: usize) -> Result<Plan, String> {
        let cid_prefix = if self.counter_cids {
            "c".to_string()
        } else {
            // Unique per user, like the random ids real clients make.
            let mut h = std::collections::hash_map::DefaultHasher::new();
            std::hash::Hash::hash(&user, &mut h);
            format!("{:016x}-", std::hash::Hasher::finish(&h))
        };
        Ok(Plan {
            cid_prefix,
            token: self.token(&user)?,
            user,
            send: None,
            expect: Vec::new(),
            create: None,
            churn: false,
            source: self.source(idx),
            node: 0,
            seed: idx as u64 + 1,
        })
    }
}

fn base36(mut v: u64) -> String {
    let digits = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = Vec::new();
    while v > 0 {
        out.push(digits[(v % 36) as usize]);
        v /= 36;
    }
    out.reverse();
    String::from_utf8(out).unwrap_or_default()
}

/// The direct conversation key of two users.
fn dm(a: &str, b: &str) -> String {
    if a <= b {
        format!("dm:{a}:{b}")
    } else {
        format!("dm:{b}:{a}")
    }
}

/// Share `total` over `n` senders.
fn split(total: u64, n: usize, i: usize) -> u64 {
    let n = n as u64;
    total / n + u64::from((i as u64) < total % n)
}

/// One phase of clients: spawn, wait until connected, send, drain, finish.
struct Run {
    sh: Arc<Shared>,
    phase: watch::Sender<Phase>,
    handles: Vec<JoinHandle<ClientResult>>,
    n_senders: usize,
    server_pids: Vec<u32>,
    sample_every: Duration,
    samples: Vec<Value>,
    t0: Instant,
    start: Option<Instant>,
    sending_ended: Option<Instant>,
    complete: bool,
    notes: Vec<String>,
}

struct RunSettings {
    pace: Pace,
    duration: Duration,
    deadline: Instant,
    ws_config: WebSocketConfig,
    churn_every: Duration,
}

impl Run {
    fn new(c: &Common, s: RunSettings) -> Run {
        let (phase, _) = watch::channel(Phase::Connecting);
        let epoch = Instant::now();
        let epoch_unix_us = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_micros() as u64;
        let sh = Arc::new(Shared {
            targets: c.targets.clone(),
            ws_config: s.ws_config,
            pace: s.pace,
            duration: s.duration,
            deadline: s.deadline,
            ack_every: Duration::from_millis(c.ack_ms),
            churn_every: s.churn_every,
            churn_away: (Duration::from_millis(500), Duration::from_millis(3000)),
            body_pad: c.body_pad.clone(),
            connect_sem: Arc::new(Semaphore::new(c.connect_concurrency)),
            ready: AtomicUsize::new(0),
            groups_created: AtomicUsize::new(0),
            senders_done: AtomicUsize::new(0),
            sent_ok: AtomicU64::new(0),
            expected: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            inflight: AtomicU64::new(0),
            stop_sending: AtomicBool::new(false),
            fatal: Mutex::new(None),
            epoch,
            epoch_unix_us,
        });
        Run {
            sh,
            phase,
            handles: Vec::new(),
            n_senders: 0,
            server_pids: c.server_pids.clone(),
            sample_every: Duration::from_secs_f64(c.sample_secs),
            samples: Vec::new(),
            t0: Instant::now(),
            start: None,
            sending_ended: None,
            complete: false,
            notes: Vec::new(),
        }
    }

    fn spawn(&mut self, plan: Plan) {
        if plan.send.is_some() {
            self.n_senders += 1;
        }
        let c = Client::new(plan, self.sh.clone(), self.phase.subscribe());
        self.handles.push(tokio::spawn(c.run()));
    }

    fn fatal(&self) -> Option<String> {
        self.sh
            .fatal
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn sample(&mut self, force: bool) {
        if self.server_pids.is_empty() {
            return;
        }
        let t = self.t0.elapsed().as_secs_f64();
        let last = self
            .samples
            .last()
            .and_then(|s| s[0].as_f64())
            .unwrap_or(f64::NEG_INFINITY);
        if force || t - last >= self.sample_every.as_secs_f64() {
            self.samples.push(json!([
                (t * 10.0).round() / 10.0,
                sys::rss_kib_sum(&self.server_pids)
            ]));
        }
    }

    fn progress(&self, what: &str) {
        let sh = &self.sh;
        eprintln!(
            "chat-hub-load [{:>6.1}s] {what}: ready {} sent {} delivered {}/{} in flight {}",
            self.t0.elapsed().as_secs_f64(),
            sh.ready.load(Relaxed),
            sh.sent_ok.load(Relaxed),
            sh.delivered.load(Relaxed),
            sh.expected.load(Relaxed),
            sh.inflight.load(Relaxed),
        );
    }

    /// Wait until `n` clients are connected and synced (and `groups` groups created).
    async fn wait_ready(&mut self, n: usize, groups: usize, limit: Duration) -> Result<(), String> {
        let until = (Instant::now() + limit).min(self.sh.deadline);
        let mut last_report = Instant::now();
        loop {
            if let Some(f) = self.fatal() {
                return Err(f);
            }
            let ready = self.sh.ready.load(Relaxed);
            if ready >= n && self.sh.groups_created.load(Relaxed) >= groups {
                return Ok(());
            }
            if Instant::now() >= until {
                return Err(format!(
                    "only {ready} of {n} clients connected and synced ({} of {groups} groups created) in time",
                    self.sh.groups_created.load(Relaxed)
                ));
            }
            if last_report.elapsed() >= Duration::from_secs(5) {
                last_report = Instant::now();
                self.progress("connecting");
            }
            self.sample(false);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn start(&mut self) -> Instant {
        let now = Instant::now();
        self.start = Some(now);
        let _ = self.phase.send(Phase::Sending(now));
        now
    }

    /// Wait until every sender is done and every `sent` message was delivered
    /// (`deliveries`), or the drain time ran out, or the deadline.
    async fn wait_done(&mut self, deliveries: bool, drain: Duration, hold: Option<Duration>) {
        let mut last_report = Instant::now();
        let hold_until = hold.map(|h| Instant::now() + h);
        loop {
            let now = Instant::now();
            let sh = &self.sh;
            let senders_done = sh.senders_done.load(Relaxed) >= self.n_senders;
            let flights = sh.inflight.load(Relaxed);
            if senders_done && self.sending_ended.is_none() {
                self.sending_ended = Some(now);
            }
            let delivered_all =
                !deliveries || sh.delivered.load(Relaxed) >= sh.expected.load(Relaxed);
            if let Some(f) = self.fatal() {
                self.notes.push(f);
                break;
            }
            if senders_done && flights == 0 && delivered_all && hold_until.is_none_or(|h| now >= h)
            {
                self.complete = true;
                break;
            }
            if let Some(ended) = self.sending_ended {
                if now.duration_since(ended) >= drain && hold_until.is_none_or(|h| now >= h) {
                    self.notes.push(format!(
                        "drain time ({:.0} s) ran out with {flights} sends unanswered and {} deliveries missing",
                        drain.as_secs_f64(),
                        sh.expected
                            .load(Relaxed)
                            .saturating_sub(sh.delivered.load(Relaxed))
                    ));
                    break;
                }
            }
            if now >= sh.deadline {
                sh.stop_sending.store(true, Relaxed);
                self.notes.push("hard deadline reached".into());
                break;
            }
            if last_report.elapsed() >= Duration::from_secs(5) {
                last_report = now;
                self.progress("running");
            }
            self.sample(false);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Tell every client to finish and collect what they saw.
    async fn finish(&mut self) -> Vec<ClientResult> {
        let _ = self.phase.send(Phase::Finish);
        self.sh.stop_sending.store(true, Relaxed);
        let mut out = Vec::with_capacity(self.handles.len());
        let until = Instant::now().max(self.sh.deadline) + Duration::from_secs(10);
        let mut lost_tasks = 0;
        for h in self.handles.drain(..) {
            let abort = h.abort_handle();
            match tokio::time::timeout_at(until.into(), h).await {
                Ok(Ok(r)) => out.push(r),
                _ => {
                    abort.abort();
                    lost_tasks += 1;
                }
            }
        }
        if lost_tasks > 0 {
            self.complete = false;
            self.notes
                .push(format!("{lost_tasks} clients did not finish in time"));
        }
        out
    }
}

/// Everything the clients of one or more runs saw, added up.
#[derive(Default)]
struct Totals {
    clients: usize,
    sent: u64,
    send_errors: u64,
    skipped: u64,
    unconfirmed: u64,
    delivered: u64,
    backlog_delivered: u64,
    expected_deliveries: u64,
    lost: u64,
    duplicates: u64,
    repeated_on_connection: u64,
    out_of_order: u64,
    connects: u64,
    connect_errors: u64,
    unexpected_closes: u64,
    churns: u64,
    errors: HashMap<String, u64>,
    latency: Vec<u32>,
    sent_latency: Vec<u32>,
    lag: Vec<u32>,
    connect: Vec<u32>,
    last_delivery: Option<Instant>,
    last_sent: Option<Instant>,
}

impl Totals {
    fn add(&mut self, results: Vec<ClientResult>) {
        // Every seq that some sender got `sent` for, per conversation.
        let mut sent: HashMap<String, Bitmap> = HashMap::new();
        for r in &results {
            if let Some(conv) = &r.sent_conv {
                sent.entry(conv.clone())
                    .or_default()
                    .union_with(&r.sent_bits);
            }
        }
        let empty = Bitmap::default();
        for mut r in results {
            self.clients += 1;
            for conv in &r.expect {
                if let Some(s) = sent.get(conv) {
                    let have = r.marks.get(conv).unwrap_or(&empty);
                    self.lost += s.count_missing_from(have);
                    // Expected: what was sent to the conversation less the user's own.
                    let own = if r.sent_conv.as_deref() == Some(conv.as_str()) {
                        r.sent
                    } else {
                        0
                    };
                    self.expected_deliveries += s.count_missing_from(&empty) - own;
                }
            }
            self.sent += r.sent;
            self.send_errors += r.send_errors;
            self.skipped += r.skipped;
            self.unconfirmed += r.unconfirmed;
            self.delivered += r.delivered;
            self.backlog_delivered += r.backlog_delivered;
            self.duplicates += r.duplicates;
            self.repeated_on_connection += r.repeated_on_connection;
            self.out_of_order += r.out_of_order;
            self.connects += r.connects;
            self.connect_errors += r.connect_errors;
            self.unexpected_closes += r.unexpected_closes;
            self.churns += r.churns;
            for (k, v) in r.errors.drain() {
                *self.errors.entry(k).or_default() += v;
            }
            self.latency.append(&mut r.latency_us);
            self.sent_latency.append(&mut r.sent_latency_us);
            self.lag.append(&mut r.lag_us);
            self.connect.append(&mut r.connect_us);
            self.last_delivery = self.last_delivery.max(r.last_delivery);
            self.last_sent = self.last_sent.max(r.last_sent);
        }
    }

    fn ok(&self) -> bool {
        self.lost == 0 && self.out_of_order == 0 && self.send_errors == 0 && self.unconfirmed == 0
    }

    /// The figures as JSON; throughput over the time from `start`.
    fn report(&mut self, start: Option<Instant>, out: &mut Map<String, Value>) {
        let secs = |t: Option<Instant>| -> Option<f64> {
            Some(t?.saturating_duration_since(start?).as_secs_f64()).filter(|s| *s > 0.0)
        };
        let rate = |n: u64, s: Option<f64>| s.map(|s| (n as f64 / s).round());
        let send_secs = secs(self.last_sent);
        let deliver_secs = secs(self.last_delivery);
        out.insert("clients".into(), json!(self.clients));
        out.insert("sent".into(), json!(self.sent));
        out.insert("delivered".into(), json!(self.delivered));
        out.insert(
            "expected_deliveries".into(),
            json!(self.expected_deliveries),
        );
        out.insert("lost".into(), json!(self.lost));
        out.insert("duplicates".into(), json!(self.duplicates));
        out.insert("out_of_order".into(), json!(self.out_of_order));
        out.insert(
            "duplicates_behind_on_connection".into(),
            json!(self.repeated_on_connection),
        );
        out.insert("send_errors".into(), json!(self.send_errors));
        out.insert("unconfirmed_sends".into(), json!(self.unconfirmed));
        out.insert("skipped_sends".into(), json!(self.skipped));
        out.insert("backlog_deliveries".into(), json!(self.backlog_delivered));
        out.insert("send_secs".into(), json!(send_secs.map(round3)));
        out.insert("deliver_secs".into(), json!(deliver_secs.map(round3)));
        out.insert("sent_per_sec".into(), json!(rate(self.sent, send_secs)));
        out.insert(
            "delivered_per_sec".into(),
            json!(rate(self.delivered, deliver_secs)),
        );
        out.insert("latency_ms".into(), summary_ms(&mut self.latency));
        out.insert("sent_latency_ms".into(), summary_ms(&mut self.sent_latency));
        if !self.lag.is_empty() {
            out.insert("send_lag_ms".into(), summary_ms(&mut self.lag));
        }
        out.insert("connect_to_synced_ms".into(), summary_ms(&mut self.connect));
        out.insert("connects".into(), json!(self.connects));
        out.insert("connect_errors".into(), json!(self.connect_errors));
        out.insert("unexpected_closes".into(), json!(self.unexpected_closes));
        out.insert("reconnects_by_churn".into(), json!(self.churns));
        let mut errors: Vec<(&String, &u64)> = self.errors.iter().collect();
        errors.sort();
        let errors: Map<String, Value> = errors
            .into_iter()
            .take(20)
            .map(|(k, v)| (k.clone(), json!(v)))
            .collect();
        if errors.keys().any(|k| k.contains("rate_limited")) {
            out.insert(
                "hint".into(),
                json!("the server rate-limits the senders: run it with CHAT_HUB_RATE_PER_SEC=1000000 CHAT_HUB_RATE_BURST=1000000"),
            );
        }
        out.insert("errors".into(), Value::Object(errors));
    }
}

fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

fn ws_config(small: bool) -> WebSocketConfig {
    let c = WebSocketConfig::default();
    if small {
        c.read_buffer_size(4096).write_buffer_size(0)
    } else {
        c.read_buffer_size(64 * 1024).write_buffer_size(64 * 1024)
    }
}

/// The run's pacing from the options.
fn pace(
    rate: Option<f64>,
    window: Option<u64>,
    senders: usize,
    default_window: u64,
) -> (Pace, Value) {
    match rate {
        Some(r) => (
            Pace::Rate {
                interval: Duration::from_secs_f64(senders.max(1) as f64 / r),
            },
            json!({"mode": "rate", "rate": r}),
        ),
        None => {
            let w = window.unwrap_or(default_window);
            (
                Pace::Window(w as usize),
                json!({"mode": "window", "window": w}),
            )
        }
    }
}

fn offset(p: &Pace, i: usize, n: usize) -> Duration {
    match p {
        Pace::Rate { interval } => interval.mul_f64(i as f64 / n.max(1) as f64),
        Pace::Window(_) => Duration::ZERO,
    }
}

fn deadline(c: &Common, connects: usize, duration: f64) -> Instant {
    let secs = c
        .deadline
        .unwrap_or(60.0 + connects as f64 / 100.0 + duration + c.drain + 30.0);
    Instant::now() + Duration::from_secs_f64(secs)
}

fn connect_limit(connects: usize) -> Duration {
    Duration::from_secs_f64(30.0 + connects as f64 / 50.0)
}

struct Outcome {
    ok: bool,
    fields: Map<String, Value>,
}

/// direct and soak: P pairs, sender i sends to receiver i.
async fn direct(c: &Common, m: &ArgMatches, soak: bool) -> Result<Outcome, String> {
    let pairs = m
        .get_one::<usize>("pairs")
        .copied()
        .unwrap_or(if c.quick { 4 } else { 50 })
        .max(1);
    let (def_rate, def_dur) = match (soak, c.quick) {
        (true, true) => (Some(200.0), 6.0),
        (true, false) => (Some(2000.0), 180.0),
        (false, true) => (None, 30.0),
        (false, false) => (None, 20.0),
    };
    let duration = c.duration.unwrap_or(def_dur);
    let messages = c
        .messages
        .unwrap_or(if c.quick && !soak { 400 } else { 100_000_000 });
    let churn = if soak {
        m.get_one::<f64>("churn").copied().unwrap_or(2.0)
    } else {
        0.0
    };
    sys::ensure_nofile(2 * pairs as u64 + 64)?;
    let (pace, pace_json) = pace(c.rate.or(def_rate), c.window, pairs, 32);
    let mut run = Run::new(
        c,
        RunSettings {
            pace,
            duration: Duration::from_secs_f64(duration),
            deadline: deadline(c, 2 * pairs, duration),
            ws_config: ws_config(false),
            churn_every: Duration::from_secs_f64(if churn > 0.0 {
                pairs as f64 / churn
            } else {
                1e9
            }),
        },
    );
    for i in 0..pairs {
        let (s, r) = (format!("{}s{i}", c.prefix), format!("{}r{i}", c.prefix));
        let conv = dm(&s, &r);
        let mut sp = c.plan(s, 2 * i)?;
        sp.send = Some(SendPlan {
            to_json: format!(r#"{{"user":"{r}"}}"#),
            quota: split(messages, pairs, i),
            fanout: 1,
            offset: offset(&pace, i, pairs),
        });
        // With several nodes, the receiver is on the node after the sender's.
        sp.node = c.node(i);
        let mut rp = c.plan(r, 2 * i + 1)?;
        rp.node = c.node(i + 1);
        rp.expect = vec![conv];
        rp.churn = soak && churn > 0.0;
        run.spawn(sp);
        run.spawn(rp);
    }
    let mut fields = Map::new();
    fields.insert("pairs".into(), json!(pairs));
    fields.insert("pace".into(), pace_json);
    fields.insert("duration_secs".into(), json!(duration));
    fields.insert("messages_limit".into(), json!(messages));
    if soak {
        fields.insert("churn_per_sec".into(), json!(churn));
    }
    drive(c, run, 2 * pairs, 0, true, None, fields).await
}

/// Connect, (create groups,) send, drain, finish, and add it all up.
async fn drive(
    c: &Common,
    mut run: Run,
    clients: usize,
    groups: usize,
    deliveries: bool,
    hold: Option<Duration>,
    mut fields: Map<String, Value>,
) -> Result<Outcome, String> {
    let cpu0 = sys::cpu_secs("self");
    let srv_cpu0 = sys::cpu_secs_sum(&c.server_pids);
    run.sample(true);
    let ready = run
        .wait_ready(clients, groups, connect_limit(clients))
        .await;
    if let Err(e) = &ready {
        run.notes.push(e.clone());
    } else {
        run.progress("all connected");
        let start = run.start();
        let _ = start;
        run.wait_done(deliveries, Duration::from_secs_f64(c.drain), hold)
            .await;
        run.progress("finishing");
    }
    let srv_cpu1 = sys::cpu_secs_sum(&c.server_pids);
    let cpu1 = sys::cpu_secs("self");
    run.sample(true);
    let results = run.finish().await;
    let mut t = Totals::default();
    t.add(results);
    t.report(run.start, &mut fields);
    let ok = ready.is_ok() && run.complete && t.ok();
    let active = run.start.map(|s| s.elapsed().as_secs_f64());
    fields.insert(
        "generator_cpu_secs".into(),
        json!(cpu0.zip(cpu1).map(|(a, b)| round3(b - a))),
    );
    fields.insert(
        "server_cpu_secs".into(),
        json!(srv_cpu0.zip(srv_cpu1).map(|(a, b)| round3(b - a))),
    );
    fields.insert("active_secs".into(), json!(active.map(round3)));
    if !c.server_pids.is_empty() {
        fields.insert("server_rss_kib".into(), Value::Array(run.samples.clone()));
    }
    fields.insert("complete".into(), json!(run.complete));
    fields.insert("notes".into(), json!(run.notes));
    Ok(Outcome { ok, fields })
}

/// group: G groups of K members, created over the protocol, everyone sending.
async fn group(c: &Common, m: &ArgMatches) -> Result<Outcome, String> {
    let groups = m
        .get_one::<usize>("groups")
        .copied()
        .unwrap_or(if c.quick { 2 } else { 10 })
        .max(1);
    let members = m
        .get_one::<usize>("members")
        .copied()
        .unwrap_or(if c.quick { 5 } else { 50 })
        .max(2);
    let duration = c.duration.unwrap_or(if c.quick { 30.0 } else { 20.0 });
    let messages = c
        .messages
        .unwrap_or(if c.quick { 200 } else { 100_000_000 });
    let n = groups * members;
    sys::ensure_nofile(n as u64 + 64)?;
    let (pace, pace_json) = pace(c.rate, c.window, n, 8);
    let mut run = Run::new(
        c,
        RunSettings {
            pace,
            duration: Duration::from_secs_f64(duration),
            deadline: deadline(c, n, duration),
            ws_config: ws_config(false),
            churn_every: Duration::from_secs(1_000_000),
        },
    );
    let mut idx = 0;
    for g in 0..groups {
        let gid = format!("{}g{g}", c.prefix);
        let users: Vec<String> = (0..members)
            .map(|k| format!("{}g{g}m{k}", c.prefix))
            .collect();
        for (k, u) in users.iter().enumerate() {
            let mut p = c.plan(u.clone(), idx)?;
            p.send = Some(SendPlan {
                to_json: format!(r#"{{"group":"{gid}"}}"#),
                quota: split(messages, n, idx),
                fanout: members as u64 - 1,
                offset: offset(&pace, idx, n),
            });
            p.expect = vec![format!("group:{gid}")];
            // Members round-robin over the nodes; the creator's node turns with the group.
            p.node = c.node(g + k);
            if k == 0 {
                let others = serde_json::to_string(&users[1..]).unwrap_or_default();
                p.create = Some(format!(
                    r#"{{"type":"group_create","group":"{gid}","name":"load {gid}","members":{others},"ref":"create"}}"#
                ));
            }
            run.spawn(p);
            idx += 1;
        }
    }
    let mut fields = Map::new();
    fields.insert("groups".into(), json!(groups));
    fields.insert("members".into(), json!(members));
    fields.insert("pace".into(), pace_json);
    fields.insert("duration_secs".into(), json!(duration));
    fields.insert("messages_limit".into(), json!(messages));
    drive(c, run, n, groups, true, None, fields).await
}

/// backlog: N messages for an offline user, then connect → synced.
async fn backlog(c: &Common, m: &ArgMatches) -> Result<Outcome, String> {
    let n = m
        .get_one::<u64>("backlog")
        .copied()
        .or(c.messages)
        .unwrap_or(if c.quick { 300 } else { 10_000 })
        .max(1);
    let repeats = m
        .get_one::<usize>("repeats")
        .copied()
        .unwrap_or(if c.quick { 1 } else { 3 })
        .max(1);
    let window = c.window.unwrap_or(64);
    let mut totals = Totals::default();
    let mut reps = Vec::new();
    let (mut to_synced, mut to_welcome) = (Vec::new(), Vec::new());
    let mut ok = true;
    let mut notes = Vec::new();
    let mut fill_secs = Vec::new();
    for rep in 0..repeats {
        let (s, r) = (
            format!("{}bs{rep}", c.prefix),
            format!("{}br{rep}", c.prefix),
        );
        // 1. The sender stores N messages for r, who is offline.
        let mut fill = Run::new(
            c,
            RunSettings {
                pace: Pace::Window(window as usize),
                duration: Duration::from_secs_f64(c.duration.unwrap_or(120.0)),
                deadline: deadline(c, 1, c.duration.unwrap_or(120.0)),
                ws_config: ws_config(false),
                churn_every: Duration::from_secs(1_000_000),
            },
        );
        let mut sp = c.plan(s.clone(), 0)?;
        sp.node = c.node(rep);
        sp.send = Some(SendPlan {
            to_json: format!(r#"{{"user":"{r}"}}"#),
            quota: n,
            fanout: 0,
            offset: Duration::ZERO,
        });
        fill.spawn(sp);
        let ready = fill.wait_ready(1, 0, connect_limit(1)).await;
        if let Err(e) = ready {
            fill.finish().await;
            return Err(e);
        }
        let t = fill.start();
        fill.wait_done(false, Duration::from_secs_f64(c.drain), None)
            .await;
        fill_secs.push(t.elapsed().as_secs_f64());
        let fill_results = fill.finish().await;
        ok &= fill.complete;
        notes.append(&mut fill.notes);
        // 2. The receiver connects: time to `synced`, everything there, in order.
        let mut read = Run::new(
            c,
            RunSettings {
                pace: Pace::Window(1),
                duration: Duration::from_secs(1),
                deadline: deadline(c, 1, 60.0),
                ws_config: ws_config(false),
                churn_every: Duration::from_secs(1_000_000),
            },
        );
        let mut rp = c.plan(r.clone(), 1)?;
        rp.node = c.node(rep + 1);
        rp.expect = vec![dm(&s, &r)];
        read.spawn(rp);
        let ready = read.wait_ready(1, 0, Duration::from_secs(60)).await;
        // Let the acks go out before closing.
        tokio::time::sleep(Duration::from_millis(c.ack_ms + 50)).await;
        let mut read_results = read.finish().await;
        if let Err(e) = ready {
            ok = false;
            notes.push(e);
        }
        let rr = read_results.first();
        let synced_ms = rr
            .and_then(|r| r.first_synced)
            .map(|d| round3(d.as_secs_f64() * 1000.0));
        let welcome_ms = rr
            .and_then(|r| r.first_welcome)
            .map(|d| round3(d.as_secs_f64() * 1000.0));
        let before_synced = rr.map_or(0, |r| r.first_backlog);
        let stored = fill_results.first().map_or(0, |r| r.sent);
        if before_synced != stored {
            ok = false;
            notes.push(format!(
                "repeat {rep}: {before_synced} of {stored} stored messages arrived before `synced`"
            ));
        }
        to_synced.extend(synced_ms);
        to_welcome.extend(welcome_ms);
        reps.push(json!({
            "stored": stored,
            "received_before_synced": before_synced,
            "connect_to_welcome_ms": welcome_ms,
            "connect_to_synced_ms": synced_ms,
        }));
        let mut both = fill_results;
        both.append(&mut read_results);
        totals.add(both);
    }
    let mut fields = Map::new();
    fields.insert("backlog".into(), json!(n));
    fields.insert("repeats".into(), json!(repeats));
    fields.insert("fill_window".into(), json!(window));
    fields.insert("repeat_results".into(), json!(reps));
    fields.insert(
        "connect_to_synced_ms_median".into(),
        json!(stats::median(&mut to_synced)),
    );
    fields.insert(
        "connect_to_synced_ms_max".into(),
        json!(to_synced.iter().copied().reduce(f64::max)),
    );
    fields.insert(
        "connect_to_welcome_ms_median".into(),
        json!(stats::median(&mut to_welcome)),
    );
    fields.insert(
        "fill_sent_per_sec".into(),
        json!(stats::median(&mut fill_secs).map(|s| (n as f64 / s).round())),
    );
    ok &= totals.ok();
    totals.report(None, &mut fields);
    for k in [
        "send_secs",
        "deliver_secs",
        "sent_per_sec",
        "delivered_per_sec",
        "latency_ms",
    ] {
        fields.remove(k);
    }
    fields.insert("complete".into(), json!(ok));
    fields.insert("notes".into(), json!(notes));
    Ok(Outcome { ok, fields })
}

/// connections: C idle authenticated connections; server RSS per connection.
async fn connections(c: &Common, m: &ArgMatches) -> Result<Outcome, String> {
    let n = m
        .get_one::<usize>("connections")
        .copied()
        .unwrap_or(if c.quick { 50 } else { 1000 })
        .max(1);
    let hold = m
        .get_one::<f64>("hold")
        .copied()
        .unwrap_or(if c.quick { 1.0 } else { 15.0 });
    let nofile = sys::ensure_nofile(n as u64 + 64)?;
    let rss = || sys::rss_kib_sum(&c.server_pids);
    let rss_before = rss();
    let mut run = Run::new(
        c,
        RunSettings {
            pace: Pace::Window(1),
            duration: Duration::from_secs(1),
            deadline: deadline(c, n, hold + 10.0),
            ws_config: ws_config(true),
            churn_every: Duration::from_secs(1_000_000),
        },
    );
    for i in 0..n {
        let mut p = c.plan(format!("{}c{i}", c.prefix), i)?;
        p.node = c.node(i);
        run.spawn(p);
    }
    let t0 = Instant::now();
    run.sample(true);
    let ready = run.wait_ready(n, 0, connect_limit(n)).await;
    let connect_secs = t0.elapsed().as_secs_f64();
    let mut rss_connected = None;
    if ready.is_ok() {
        run.progress("all connected");
        tokio::time::sleep(Duration::from_secs(3)).await;
        rss_connected = rss();
        run.sample(true);
        run.start();
        run.wait_done(
            false,
            Duration::from_secs_f64(hold),
            Some(Duration::from_secs_f64(hold)),
        )
        .await;
    } else if let Err(e) = &ready {
        run.notes.push(e.clone());
    }
    let rss_held = rss();
    let results = run.finish().await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rss_closed = rss();
    let mut t = Totals::default();
    t.add(results);
    let mut fields = Map::new();
    fields.insert("connections".into(), json!(n));
    fields.insert("hold_secs".into(), json!(hold));
    fields.insert("nofile_limit".into(), json!(nofile));
    fields.insert("connect_all_secs".into(), json!(round3(connect_secs)));
    fields.insert(
        "connected_rate_per_sec".into(),
        json!((n as f64 / connect_secs).round()),
    );
    fields.insert("server_rss_kib_before".into(), json!(rss_before));
    fields.insert("server_rss_kib_connected".into(), json!(rss_connected));
    fields.insert("server_rss_kib_after_hold".into(), json!(rss_held));
    fields.insert("server_rss_kib_after_close".into(), json!(rss_closed));
    let per = |a: Option<u64>| {
        rss_before
            .zip(a)
            .map(|(b, a)| ((a as f64 - b as f64) * 1024.0 / n as f64).round())
    };
    fields.insert(
        "server_bytes_per_connection".into(),
        json!(per(rss_connected)),
    );
    fields.insert(
        "server_bytes_per_connection_after_hold".into(),
        json!(per(rss_held)),
    );
    t.report(None, &mut fields);
    for k in [
        "sent",
        "delivered",
        "expected_deliveries",
        "lost",
        "send_errors",
        "unconfirmed_sends",
        "skipped_sends",
        "send_secs",
        "deliver_secs",
        "sent_per_sec",
        "delivered_per_sec",
        "latency_ms",
        "sent_latency_ms",
        "backlog_deliveries",
    ] {
        fields.remove(k);
    }
    let ok = ready.is_ok() && run.complete && t.ok() && t.unexpected_closes == 0;
    fields.insert("complete".into(), json!(run.complete));
    fields.insert("server_rss_kib".into(), Value::Array(run.samples.clone()));
    fields.insert("notes".into(), json!(run.notes));
    Ok(Outcome { ok, fields })
}

fn main() -> ExitCode {
    let matches = cli().get_matches();
    let Some((scenario, sub)) = matches.subcommand() else {
        return ExitCode::from(2);
    };
    let threads = sub.get_one::<usize>("threads").copied().unwrap_or(2).max(1);
    let common = match Common::from(sub) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("chat-hub-load: {e}");
            return ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("chat-hub-load: runtime: {e}");
            return ExitCode::from(2);
        }
    };
    // A watchdog in case the runtime itself wedges: every loop is bounded, this is the last resort.
    let hard = common.deadline.unwrap_or(4.0 * 3600.0) + 120.0;
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs_f64(hard));
        eprintln!("chat-hub-load: watchdog: still running after {hard:.0} s; exiting");
        std::process::exit(3);
    });
    let started = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let outcome = rt.block_on(async {
        match scenario {
            "direct" => direct(&common, sub, false).await,
            "soak" => direct(&common, sub, true).await,
            "group" => group(&common, sub).await,
            "backlog" => backlog(&common, sub).await,
            "connections" => connections(&common, sub).await,
            other => Err(format!("unknown scenario {other}")),
        }
    });
    let outcome = match outcome {
        Ok(o) => o,
        Err(e) => {
            eprintln!("chat-hub-load: {e}");
            let line =
                json!({"scenario": scenario, "ok": false, "error": e, "params": common.params});
            println!("{line}");
            return ExitCode::from(if e.contains("RLIMIT") { 2 } else { 1 });
        }
    };
    let mut line = Map::new();
    line.insert("scenario".into(), json!(scenario));
    line.insert("ok".into(), json!(outcome.ok));
    line.insert("started_unix".into(), json!(started));
    let mut params = common.params.clone();
    params.insert("generator_threads".into(), json!(threads));
    params.insert("server_pid".into(), json!(common.server_pids.first()));
    params.insert("server_pids".into(), json!(common.server_pids));
    line.insert("params".into(), Value::Object(params));
    line.extend(outcome.fields);
    println!("{}", Value::Object(line));
    rt.shutdown_timeout(Duration::from_secs(1));
    if outcome.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
