//! Test support: per-test databases on both backends, a full server on a free
//! port, a WebSocket client, and probe actors standing in for sessions.

#![allow(dead_code)]

use std::time::Duration;

use actix::prelude::*;
use chat_hub::config::{Config, DatabaseUrl};
use chat_hub::db::{open_pool, DbExecutor, Pool};
use chat_hub::hub::server::SessionEvent;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message as WsMessage;

/// How long any single wait for an event may take before the test fails.
pub const WAIT: Duration = Duration::from_secs(15);

/// Run one test body once per backend: `sqlite` always, `mysql` with the
/// `mysql` feature (which then needs `CHAT_HUB_TEST_MYSQL_URL`).
macro_rules! backend_tests {
    ($( $(#[$meta:meta])* async fn $name:ident($db:ident) $body:block )*) => {
        $(
            mod $name {
                #[allow(unused_imports)]
                use super::*;
                async fn body($db: crate::common::TestDb) $body

                #[actix_rt::test]
                $(#[$meta])*
                async fn sqlite() {
                    body(crate::common::TestDb::sqlite()).await
                }

                #[cfg(feature = "mysql")]
                #[actix_rt::test]
                $(#[$meta])*
                async fn mysql() {
                    body(crate::common::TestDb::mysql()).await
                }
            }
        )*
    };
}
pub(crate) use backend_tests;

/// A database of one test, removed when dropped.
pub struct TestDb {
    pub url: DatabaseUrl,
    _dir: Option<tempfile::TempDir>,
    mysql_drop: Option<(String, String)>,
}

impl TestDb {
    pub fn sqlite() -> TestDb {
        let dir = tempfile::tempdir().expect("temp dir");
        let url = DatabaseUrl::Sqlite(dir.path().join("chat.db"));
        TestDb {
            url,
            _dir: Some(dir),
            mysql_drop: None,
        }
    }

    #[cfg(feature = "mysql")]
    pub fn mysql() -> TestDb {
        use diesel::{Connection, RunQueryDsl};
        let base = std::env::var("CHAT_HUB_TEST_MYSQL_URL").expect(
            "the mysql tests need CHAT_HUB_TEST_MYSQL_URL, e.g. mysql://root@127.0.0.1:3306",
        );
        let base = server_part(&base);
        let name = format!("chathub_t_{}", uuid::Uuid::now_v7().simple());
        let admin = format!("{base}/mysql");
        let mut c = diesel::MysqlConnection::establish(&admin).expect("connect to MariaDB");
        diesel::sql_query(format!(
            "CREATE DATABASE {name} CHARACTER SET utf8mb4 COLLATE utf8mb4_bin"
        ))
        .execute(&mut c)
        .expect("create test database");
        TestDb {
            url: DatabaseUrl::Mysql(format!("{base}/{name}")),
            _dir: None,
            mysql_drop: Some((admin, name)),
        }
    }

    pub fn is_mysql(&self) -> bool {
        matches!(self.url, DatabaseUrl::Mysql(_))
    }

    /// Defaults, this database, a fixed secret, a free loopback port.
    pub fn config(&self) -> Config {
        let mut c = Config::defaults();
        c.database = self.url.clone();
        c.jwt_secret = Some("test-secret-0123456789abcdef".into());
        c.api_key = Some(API_KEY.into());
        c.bind = "127.0.0.1:0".parse().expect("addr");
        c.db_threads = 2;
        c.db_pool_size = 4;
        c
    }

    /// The URL as DATABASE_URL takes it.
    pub fn url_string(&self) -> String {
        match &self.url {
            DatabaseUrl::Mysql(u) => u.clone(),
            DatabaseUrl::Sqlite(p) => p.display().to_string(),
        }
    }

    pub fn pool(&self) -> Pool {
        open_pool(&self.config()).expect("open pool")
    }

    pub fn executor(&self, threads: usize) -> (Addr<DbExecutor>, Pool) {
        let pool = self.pool();
        (DbExecutor::start(threads, pool.clone()), pool)
    }
}

fn server_part(url: &str) -> String {
    // mysql://user@host:port[/db] -> mysql://user@host:port
    let after = url.find("://").map(|i| i + 3).unwrap_or(0);
    match url[after..].find('/') {
        Some(i) => url[..after + i].to_string(),
        None => url.trim_end_matches('/').to_string(),
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        #[cfg(feature = "mysql")]
        if let Some((admin, name)) = &self.mysql_drop {
            use diesel::{Connection, RunQueryDsl};
            if let Ok(mut c) = diesel::MysqlConnection::establish(admin) {
                let _ =
                    diesel::sql_query(format!("DROP DATABASE IF EXISTS {name}")).execute(&mut c);
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Probe actors: stand in for sessions in the ChatServer's maps.

pub struct Probe {
    tx: mpsc::UnboundedSender<SessionEvent>,
    /// While set, the probe stops taking from its mailbox (a session whose peer stopped reading).
    stalled: Option<tokio::sync::oneshot::Receiver<()>>,
    capacity: usize,
}

impl Actor for Probe {
    type Context = Context<Self>;
    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.set_mailbox_capacity(self.capacity);
        if let Some(rx) = self.stalled.take() {
            ctx.wait(
                async move {
                    let _ = rx.await;
                }
                .into_actor(self),
            );
        }
    }
}

impl Handler<SessionEvent> for Probe {
    type Result = ();
    fn handle(&mut self, ev: SessionEvent, _: &mut Context<Self>) {
        let _ = self.tx.send(ev);
    }
}

/// Events a probe received.
pub struct ProbeRx(pub mpsc::UnboundedReceiver<SessionEvent>);

impl ProbeRx {
    pub async fn next(&mut self) -> SessionEvent {
        tokio::time::timeout(WAIT, self.0.recv())
            .await
            .expect("probe: no event in time")
            .expect("probe closed")
    }

    /// The next event as JSON (a close becomes {"close": code}).
    pub async fn json(&mut self) -> Value {
        event_json(self.next().await)
    }

    /// Skip presence frames; the next other event as JSON.
    pub async fn json_skip_presence(&mut self) -> Value {
        loop {
            let v = self.json().await;
            if v["type"] != "presence" {
                return v;
            }
        }
    }

    pub fn try_json(&mut self) -> Option<Value> {
        self.0.try_recv().ok().map(event_json)
    }
}

/// An event as JSON: frames as sent, a close as {"close": code}, an applied ack as {"ack_accepted": true}.
fn event_json(ev: SessionEvent) -> Value {
    match ev {
        SessionEvent::Message { frame, .. }
        | SessionEvent::Frame(frame)
        | SessionEvent::BadFrame(frame) => serde_json::from_str(&frame).expect("json"),
        SessionEvent::Close { code, .. } => json!({ "close": code }),
        SessionEvent::AckAccepted => json!({ "ack_accepted": true }),
    }
}

pub fn probe() -> (Recipient<SessionEvent>, ProbeRx) {
    let (tx, rx) = mpsc::unbounded_channel();
    let addr = Probe {
        tx,
        stalled: None,
        capacity: 1024,
    }
    .start();
    (addr.recipient(), ProbeRx(rx))
}

/// A probe that does not take from its mailbox (of `capacity`) until `release` fires.
pub fn stalled_probe(
    capacity: usize,
) -> (
    Recipient<SessionEvent>,
    ProbeRx,
    tokio::sync::oneshot::Sender<()>,
) {
    let (tx, rx) = mpsc::unbounded_channel();
    let (release, stalled) = tokio::sync::oneshot::channel();
    let addr = Probe {
        tx,
        stalled: Some(stalled),
        capacity,
    }
    .start();
    (addr.recipient(), ProbeRx(rx), release)
}

// ---------------------------------------------------------------------------
// A real server and real WebSocket clients.

pub struct TestServer {
    pub running: Option<chat_hub::app::Running>,
    pub addr: std::net::SocketAddr,
    pub keys: chat_hub::auth::TokenKeys,
}

impl TestServer {
    pub async fn start(cfg: Config) -> TestServer {
        let running = chat_hub::app::start(cfg).await.expect("server starts");
        let addr = running.addr;
        let keys = running.keys.clone();
        TestServer {
            running: Some(running),
            addr,
            keys,
        }
    }

    pub fn token(&self, user: &str) -> String {
        self.keys
            .mint(&chat_hub::ids::UserId::parse(user).expect("user"), 3600)
            .expect("token")
    }

    pub fn ws_url(&self, user: &str) -> String {
        format!("ws://{}/ws?token={}", self.addr, self.token(user))
    }

    pub fn http(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub async fn connect(&self, user: &str) -> Client {
        Client::connect(&self.ws_url(user)).await
    }

    /// Connect and read up to `synced`; returns the client and the backlog frames.
    pub async fn connect_synced(&self, user: &str) -> (Client, Vec<Value>) {
        let mut c = self.connect(user).await;
        let welcome = c.recv().await;
        assert_eq!(welcome["type"], "welcome", "{welcome}");
        let mut backlog = Vec::new();
        loop {
            let f = c.recv().await;
            match f["type"].as_str() {
                Some("synced") => break,
                Some("message") => backlog.push(f),
                _ => {}
            }
        }
        (c, backlog)
    }

    pub fn server(&self) -> Addr<chat_hub::hub::server::ChatServer> {
        self.running.as_ref().expect("running").server.clone()
    }

    pub async fn stop(&mut self) {
        if let Some(r) = self.running.take() {
            r.shutdown().await;
        }
    }
}

pub struct Client {
    pub ws: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
}

/// What a connection ended with.
#[derive(Debug, PartialEq)]
pub enum Ended {
    Closed(u16),
    Dropped,
}

impl Client {
    pub async fn connect(url: &str) -> Client {
        let (ws, _) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(url))
            .await
            .expect("connect in time")
            .expect("websocket connects");
        Client { ws }
    }

    pub async fn send(&mut self, v: Value) {
        self.ws
            .send(WsMessage::Text(v.to_string().into()))
            .await
            .expect("send");
    }

    pub async fn send_raw(&mut self, m: WsMessage) {
        self.ws.send(m).await.expect("send");
    }

    /// The next text frame as JSON (pings are answered by the library).
    pub async fn recv(&mut self) -> Value {
        loop {
            let m = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("a frame in time")
                .expect("open")
                .expect("ok");
            match m {
                WsMessage::Text(t) => return serde_json::from_str(&t).expect("json"),
                WsMessage::Close(c) => panic!("closed unexpectedly: {c:?}"),
                _ => continue,
            }
        }
    }

    /// The next frame other than presence and typing.
    pub async fn recv_main(&mut self) -> Value {
        loop {
            let v = self.recv().await;
            if v["type"] != "presence" && v["type"] != "typing" {
                return v;
            }
        }
    }

    /// Read frames until one of type `ty` (others are skipped).
    pub async fn recv_type(&mut self, ty: &str) -> Value {
        loop {
            let v = self.recv().await;
            if v["type"] == ty {
                return v;
            }
        }
    }

    /// Read until the connection ends; the close code if there was one.
    pub async fn ended(&mut self) -> Ended {
        loop {
            match tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("the connection ends in time")
            {
                Some(Ok(WsMessage::Close(Some(f)))) => return Ended::Closed(u16::from(f.code)),
                Some(Ok(WsMessage::Close(None))) => return Ended::Closed(1005),
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return Ended::Dropped,
            }
        }
    }

    /// Read until the server closes: the seqs of the `sent` answers on the
    /// way are added to `sent`; the close code, if the close frame had one.
    pub async fn sent_until_close(&mut self, sent: &mut Vec<i64>) -> Option<u16> {
        loop {
            match tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("frames in time")
            {
                Some(Ok(WsMessage::Text(t))) => {
                    let v: Value = serde_json::from_str(&t).expect("json");
                    if v["type"] == "sent" {
                        sent.push(v["seq"].as_i64().expect("seq"));
                    }
                }
                Some(Ok(WsMessage::Close(f))) => return f.map(|f| u16::from(f.code)),
                Some(Ok(_)) => {}
                other => panic!("ended without a close frame: {other:?}"),
            }
        }
    }

    pub async fn close(mut self) {
        let _ = self
            .ws
            .close(Some(tokio_tungstenite::tungstenite::protocol::CloseFrame {
                code: CloseCode::Normal,
                reason: "".into(),
            }))
            .await;
    }
}

/// Wait until `cond` holds, polling the server state (bounded).
pub async fn eventually<F, Fut>(what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    while tokio::time::Instant::now() < deadline {
        if cond().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out waiting for: {what}");
}

// ---------------------------------------------------------------------------
// End-to-end helpers (ws.rs, process.rs): plain HTTP, refused upgrades, a
// hand-made WebSocket that never answers, the server's counters.

/// The server API key of [`TestDb::config`].
pub const API_KEY: &str = "test-api-key-0123456789";

/// A server API call with the test key: the status and the JSON body (null if none).
pub async fn api(s: &TestServer, method: &str, path: &str, body: Value) -> (u16, Value) {
    let auth = format!("Bearer {API_KEY}");
    let body = if body.is_null() {
        String::new()
    } else {
        body.to_string()
    };
    let (status, text) = http_request(
        s.addr,
        method,
        path,
        &[
            ("Authorization", &auth),
            ("Content-Type", "application/json"),
        ],
        &body,
    )
    .await;
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// Send a `ping` and read until its `pong`: the seqs of the `sent` answers
/// read on the way (a session answers in order, so every send made before
/// the ping has been handed to the hub by then).
pub async fn sent_until_pong(c: &mut Client) -> Vec<i64> {
    c.send(serde_json::json!({"type": "ping", "ref": "last"}))
        .await;
    let mut sent = Vec::new();
    loop {
        let v = c.recv().await;
        match v["type"].as_str() {
            Some("sent") => sent.push(v["seq"].as_i64().expect("seq")),
            Some("pong") => return sent,
            _ => {}
        }
    }
}

/// One HTTP/1.0 request on a fresh connection: the status and the body.
pub async fn http_request(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let io = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        let mut req = format!(
            "{method} {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Length: {}\r\n",
            body.len()
        );
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        req.push_str(body);
        s.write_all(req.as_bytes()).await?;
        let mut out = Vec::new();
        s.read_to_end(&mut out).await?;
        Ok::<_, std::io::Error>(out)
    };
    let raw = tokio::time::timeout(WAIT, io)
        .await
        .expect("http answer in time")
        .expect("http request");
    parse_http_response(&raw)
        .unwrap_or_else(|| panic!("not an HTTP response: {:?}", String::from_utf8_lossy(&raw)))
}

/// Status and body of a raw HTTP/1.x response (not chunked).
pub fn parse_http_response(raw: &[u8]) -> Option<(u16, String)> {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status = head
        .lines()
        .next()?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some((status, body.to_string()))
}

/// Try to open a WebSocket with extra headers: the client, or the HTTP status that refused it.
pub async fn ws_try_connect(url: &str, headers: &[(&str, &str)]) -> Result<Client, u16> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::http::{HeaderName, HeaderValue};
    let mut req = url.into_client_request().expect("request");
    for (k, v) in headers {
        let name = HeaderName::from_bytes(k.as_bytes()).expect("header name");
        req.headers_mut()
            .insert(name, HeaderValue::from_str(v).expect("header value"));
    }
    match tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(req))
        .await
        .expect("answer in time")
    {
        Ok((ws, _)) => Ok(Client { ws }),
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => Err(resp.status().as_u16()),
        Err(e) => panic!("connect failed other than by an HTTP answer: {e}"),
    }
}

/// A WebSocket upgraded by hand on a raw TCP stream; the caller decides
/// whether it ever reads (a client that never answers pings).
pub async fn raw_ws_upgrade(addr: std::net::SocketAddr, path: &str) -> tokio::net::TcpStream {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let io = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        s.write_all(req.as_bytes()).await?;
        // Read the response head byte by byte, so no WebSocket frame is consumed.
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let mut b = [0u8; 1];
            if s.read(&mut b).await? == 0 {
                break;
            }
            head.push(b[0]);
        }
        Ok::<_, std::io::Error>((s, head))
    };
    let (s, head) = tokio::time::timeout(WAIT, io)
        .await
        .expect("upgrade in time")
        .expect("upgrade");
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 101"), "not upgraded: {head}");
    s
}

/// The server's counters.
pub async fn stats(server: &TestServer) -> chat_hub::hub::server::Stats {
    server
        .server()
        .send(chat_hub::hub::server::GetStats)
        .await
        .expect("stats")
}

/// Wait until the server has exactly `n` sessions registered.
pub async fn sessions_become(server: &TestServer, n: usize) {
    let addr = server.server();
    eventually(&format!("{n} sessions registered"), || {
        let addr = addr.clone();
        async move {
            addr.send(chat_hub::hub::server::GetStats)
                .await
                .map(|s| s.sessions == n)
                .unwrap_or(false)
        }
    })
    .await;
}
