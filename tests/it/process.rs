//! The real binary as a child process: `chat-hub token`, configuration
//! refused at start-up, `--help`, SIGTERM, and (with MariaDB) two processes
//! sharing one database.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use serde_json::{json, Value};

use crate::common::*;

const SECRET: &str = "process-test-secret-0123456789";

/// The binary with a clean environment: no CHAT_HUB_* or DATABASE_URL from outside.
fn chat_hub() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_chat-hub"));
    for (k, _) in std::env::vars() {
        if k.starts_with("CHAT_HUB_") || k == "DATABASE_URL" || k == "RUST_LOG" {
            c.env_remove(k);
        }
    }
    c.env("RUST_LOG", "warn").stdin(Stdio::null());
    c
}

/// A loopback address with a port that was free a moment ago.
fn free_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr")
}

/// Run to completion, bounded: a command that starts serving instead of
/// refusing is killed and fails the test.
fn run_to_exit(mut cmd: Command) -> Output {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn chat-hub");
    let deadline = std::time::Instant::now() + WAIT;
    while child.try_wait().expect("try_wait").is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("output");
            panic!(
                "chat-hub did not exit; stderr: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("output")
}

/// A `chat-hub` serving as a child process, killed when dropped.
struct Server {
    child: Child,
    addr: SocketAddr,
    log: std::path::PathBuf,
}

impl Server {
    /// Start with `env` on a free port and wait until GET /healthz answers 200.
    fn start(dir: &Path, env: &[(&str, &str)]) -> Server {
        let addr = free_addr();
        let log = dir.join(format!("chat-hub-{}.log", addr.port()));
        let mut cmd = chat_hub();
        cmd.env("CHAT_HUB_BIND", addr.to_string()).current_dir(dir);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let f = std::fs::File::create(&log).expect("log file");
        let child = cmd
            .stdout(Stdio::null())
            .stderr(f)
            .spawn()
            .expect("spawn chat-hub");
        let mut s = Server { child, addr, log };
        s.wait_ready();
        s
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn wait_ready(&mut self) {
        for _ in 0..600 {
            if let Some(st) = self.child.try_wait().expect("try_wait") {
                panic!(
                    "chat-hub exited with {st} before it was ready: {}",
                    self.log()
                );
            }
            if matches!(get(self.addr, "/healthz"), Some((200, _))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("chat-hub was not ready in time: {}", self.log());
    }

    fn ws_url(&self, token: &str) -> String {
        format!("ws://{}/ws?token={token}", self.addr)
    }

    fn sigterm(&self) {
        let st = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(st.success());
    }

    /// Wait (bounded) for the process to exit.
    fn wait_exit(&mut self) -> std::process::ExitStatus {
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            if let Some(st) = self.child.try_wait().expect("try_wait") {
                return st;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "chat-hub did not exit: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// GET over a fresh connection (HTTP/1.0); None if nothing answers.
fn get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .ok()?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).ok()?;
    parse_http_response(&out)
}

fn token_for(user: &str) -> String {
    chat_hub::auth::TokenKeys::new(SECRET)
        .mint(&chat_hub::ids::UserId::parse(user).unwrap(), 3600)
        .unwrap()
}

async fn connect_synced(url: &str) -> (Client, Vec<Value>) {
    let mut c = Client::connect(url).await;
    assert_eq!(c.recv().await["type"], "welcome");
    let mut backlog = Vec::new();
    loop {
        let f = c.recv().await;
        match f["type"].as_str() {
            Some("synced") => return (c, backlog),
            Some("message") => backlog.push(f),
            _ => {}
        }
    }
}

#[actix_rt::test]
async fn token_command_prints_a_token_the_server_accepts() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("chat.db");
    let db_url = db.display().to_string();
    let mut cmd = chat_hub();
    cmd.env("DATABASE_URL", &db_url).args(["token", "alice"]);
    let out = run_to_exit(cmd);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "one line and nothing else: {stdout:?}");
    let token = lines[0];
    let parts: Vec<&str> = token.split('.').collect();
    assert_eq!(parts.len(), 3, "a JWT: {token}");
    assert!(
        parts.iter().all(|p| !p.is_empty()
            && p.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')),
        "{token}"
    );
    // The secret was generated next to the database, readable by the owner only.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir.path().join("chat.db.secret"))
        .expect("secret file")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    // An invalid user: refused, nothing on stdout.
    let mut cmd = chat_hub();
    cmd.env("DATABASE_URL", &db_url).args(["token", "al ice"]);
    let out = run_to_exit(cmd);
    assert!(!out.status.success());
    assert!(out.stdout.is_empty());
    // A server on the same database accepts the token (sqlite:// form of the URL).
    let server = Server::start(
        dir.path(),
        &[("DATABASE_URL", &format!("sqlite://{db_url}"))],
    );
    let (status, _) = get(server.addr, "/readyz").expect("readyz");
    assert_eq!(status, 200);
    let mut c = Client::connect(&server.ws_url(token)).await;
    let w = c.recv().await;
    assert_eq!(
        (w["type"].as_str(), w["user"].as_str()),
        (Some("welcome"), Some("alice"))
    );
    assert_eq!(c.recv().await["type"], "synced");
    // A token minted with another secret is refused.
    let wrong = chat_hub::auth::TokenKeys::new("some-other-secret-0123456789")
        .mint(&chat_hub::ids::UserId::parse("alice").unwrap(), 60)
        .unwrap();
    assert_eq!(
        ws_try_connect(&server.ws_url(&wrong), &[]).await.err(),
        Some(401)
    );
    // `--ttl-secs` is honoured: a second token also works.
    let mut cmd = chat_hub();
    cmd.env("DATABASE_URL", &db_url)
        .args(["token", "bob", "--ttl-secs", "120"]);
    let out = run_to_exit(cmd);
    assert!(out.status.success());
    let t2 = String::from_utf8(out.stdout).unwrap();
    let mut c = Client::connect(&server.ws_url(t2.trim())).await;
    assert_eq!(c.recv().await["user"], "bob");
}

#[test]
fn bad_configuration_is_refused_at_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("chat.db").display().to_string();
    let bind = free_addr().to_string();
    let cfg_file = dir.path().join("chat-hub.toml");
    std::fs::write(&cfg_file, "max_body_bytes = 100\ncolour = \"blue\"\n").unwrap();
    // (environment, arguments, what the refusal must name)
    type Case<'a> = (Vec<(&'a str, &'a str)>, Vec<String>, &'a str);
    let mut cases: Vec<Case> = vec![
        (
            vec![("CHAT_HUB_RATE_PER_SEC", "abc")],
            vec![],
            "CHAT_HUB_RATE_PER_SEC",
        ),
        (
            vec![("CHAT_HUB_RATE_BURST", "0")],
            vec![],
            "CHAT_HUB_RATE_BURST",
        ),
        (
            vec![("CHAT_HUB_HEARTBEAT_TIMEOUT_SECS", "1")],
            vec![],
            "CHAT_HUB_HEARTBEAT_TIMEOUT_SECS",
        ),
        (vec![("CHAT_HUB_BIND", "nowhere")], vec![], "CHAT_HUB_BIND"),
        (
            vec![("CHAT_HUB_DEV_LOGIN", "1"), ("CHAT_HUB_BIND", "0.0.0.0:0")],
            vec![],
            "CHAT_HUB_DEV_LOGIN",
        ),
        (
            vec![("DATABASE_URL", "postgres://h/db")],
            vec![],
            "DATABASE_URL",
        ),
        (
            vec![],
            vec!["--config".into(), cfg_file.display().to_string()],
            "colour",
        ),
        (
            vec![],
            vec!["--max-frame-bytes".into(), "10".into()],
            "--max-frame-bytes",
        ),
        (
            vec![("CHAT_HUB_JWT_SECRET", "short")],
            vec![],
            "CHAT_HUB_JWT_SECRET",
        ),
    ];
    if cfg!(feature = "mysql") {
        // MySQL needs an explicit secret: refused before any connection is tried.
        cases.push((
            vec![("DATABASE_URL", "mysql://root@127.0.0.1:1/chat")],
            vec![],
            "CHAT_HUB_JWT_SECRET",
        ));
    } else {
        cases.push((
            vec![("DATABASE_URL", "mysql://root@127.0.0.1:1/chat")],
            vec![],
            "DATABASE_URL",
        ));
    }
    for (env, args, names) in &cases {
        let mut cmd = chat_hub();
        cmd.env("DATABASE_URL", &db)
            .env("CHAT_HUB_BIND", &bind)
            .current_dir(dir.path());
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.args(args);
        let out = run_to_exit(cmd);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{env:?} {args:?} was accepted");
        assert!(
            stderr.contains(names),
            "{env:?} {args:?}: the message should name {names}: {stderr}"
        );
    }
    // Refused before anything was created or listened on.
    assert!(get(bind.parse().unwrap(), "/healthz").is_none());

    let mut cmd = chat_hub();
    cmd.arg("--help");
    let out = run_to_exit(cmd);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--config",
        "--bind",
        "--database-url",
        "--allowed-origins",
        "--max-body-bytes",
        "--max-frame-bytes",
        "--max-bad-frames",
        "--rate-per-sec",
        "--rate-burst",
        "--heartbeat-timeout-secs",
        "--db-timeout-secs",
        "--dev-login",
        "token",
    ] {
        assert!(
            help.contains(flag),
            "--help does not mention {flag}: {help}"
        );
    }
}

#[actix_rt::test]
async fn sigterm_stores_what_was_received_closes_1001_and_exits_0() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("chat.db").display().to_string();
    let env = [
        ("DATABASE_URL", db.as_str()),
        ("CHAT_HUB_JWT_SECRET", SECRET),
    ];
    let mut server = Server::start(dir.path(), &env);
    let (mut a, _) = connect_synced(&server.ws_url(&token_for("alice"))).await;
    let (mut b, _) = connect_synced(&server.ws_url(&token_for("bob"))).await;
    for i in 0..30 {
        a.send(json!({"type": "send", "to": {"user": "bob"}, "body": format!("m{i}"), "client_id": format!("t{i}")})).await;
    }
    let mut sent = sent_until_pong(&mut a).await;
    server.sigterm();
    let code = a.sent_until_close(&mut sent).await;
    assert_eq!(code, Some(1001));
    assert_eq!(sent, (1..=30).collect::<Vec<_>>());
    assert_eq!(b.ended().await, Ended::Closed(1001));
    let st = server.wait_exit();
    assert_eq!(st.code(), Some(0), "{}", server.log());
    // Everything is there after a restart.
    let server = Server::start(dir.path(), &env);
    let (_b, backlog) = connect_synced(&server.ws_url(&token_for("bob"))).await;
    let seqs: Vec<i64> = backlog.iter().map(|m| m["seq"].as_i64().unwrap()).collect();
    assert_eq!(seqs, (1..=30).collect::<Vec<_>>());
}

/// Two chat-hub processes on one MariaDB database; clients on both send into
/// one conversation at once: its seqs are exactly 1..=N, N the `sent` answers.
#[cfg(feature = "mysql")]
#[actix_rt::test]
async fn two_processes_one_conversation_no_gap_no_duplicate() {
    let db = TestDb::mysql();
    let dir = tempfile::tempdir().unwrap();
    let url = db.url_string();
    let env = [
        ("DATABASE_URL", url.as_str()),
        ("CHAT_HUB_JWT_SECRET", SECRET),
        ("CHAT_HUB_RATE_PER_SEC", "100000"),
        ("CHAT_HUB_RATE_BURST", "100000"),
    ];
    let one = Server::start(dir.path(), &env);
    let two = Server::start(dir.path(), &env);
    const N: usize = 100;
    let sender = |url: String, to: &'static str, tag: String| async move {
        let (mut c, _) = connect_synced(&url).await;
        let mut seqs = Vec::new();
        let mut refused = 0;
        for chunk in 0..N / 10 {
            for j in 0..10 {
                let k = chunk * 10 + j;
                c.send(json!({"type": "send", "to": {"user": to}, "body": format!("{tag} {k}"), "client_id": format!("{tag}-{k}")})).await;
            }
            for _ in 0..10 {
                let mut v = c.recv_main().await;
                while v["type"] == "message" {
                    v = c.recv_main().await;
                }
                if v["type"] == "sent" {
                    assert_eq!(v["conv"], "dm:alice:bob");
                    seqs.push(v["seq"].as_i64().unwrap());
                } else {
                    assert_eq!(
                        (v["type"].as_str(), v["code"].as_str()),
                        (Some("error"), Some("unavailable")),
                        "{v}"
                    );
                    refused += 1;
                }
            }
        }
        (seqs, refused)
    };
    let (a1, a2, b1, b2) = futures_util::future::join4(
        sender(one.ws_url(&token_for("alice")), "bob", "a1".into()),
        sender(two.ws_url(&token_for("alice")), "bob", "a2".into()),
        sender(one.ws_url(&token_for("bob")), "alice", "b1".into()),
        sender(two.ws_url(&token_for("bob")), "alice", "b2".into()),
    )
    .await;
    let mut sent: Vec<i64> = [&a1.0, &a2.0, &b1.0, &b2.0]
        .iter()
        .flat_map(|s| s.iter().copied())
        .collect();
    let refused = a1.1 + a2.1 + b1.1 + b2.1;
    sent.sort();
    let n = sent.len() as i64;
    assert!(n > 0, "nothing was stored ({refused} refused)");
    assert_eq!(
        sent,
        (1..=n).collect::<Vec<_>>(),
        "the `sent` seqs: no gap, no duplicate ({refused} refused)"
    );
    // What is stored is exactly that, read back through either process.
    let (mut c, _) = connect_synced(&two.ws_url(&token_for("alice"))).await;
    let mut stored: Vec<i64> = Vec::new();
    let mut before: Option<i64> = None;
    loop {
        let mut f = json!({"type": "history", "ref": "h", "conv": "dm:alice:bob", "limit": 200});
        if let Some(b) = before {
            f["before_seq"] = json!(b);
        }
        c.send(f).await;
        let h = c.recv_type("history").await;
        let page: Vec<i64> = h["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["seq"].as_i64().unwrap())
            .collect();
        stored.extend(&page);
        before = page.last().copied();
        if h["more"] != true {
            break;
        }
    }
    stored.reverse();
    assert_eq!(stored, (1..=n).collect::<Vec<_>>());
    drop((one, two));
}
