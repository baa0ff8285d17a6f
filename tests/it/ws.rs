//! End to end over real WebSockets: a whole server on a free port
//! (`TestServer`) and tokio-tungstenite clients. Every promise of
//! PROTOCOL.md about the WebSocket, on both backends.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use chat_hub::config::Config;
use futures_util::StreamExt;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::Message;

use crate::common::*;

async fn server_with(db: &TestDb, tweak: impl FnOnce(&mut Config)) -> TestServer {
    let mut c = db.config();
    tweak(&mut c);
    TestServer::start(c).await
}

fn now_secs() -> u64 {
    (chat_hub::now_ms() / 1000) as u64
}

static REFS: AtomicU64 = AtomicU64::new(1);

fn fresh_ref(what: &str) -> String {
    format!("{what}-{}", REFS.fetch_add(1, Ordering::Relaxed))
}

/// Everything this session receives until the answer to a `groups` request
/// sent now. The ChatServer handles requests in order, so whatever it queued
/// for this session before (messages, typing, presence, group events) comes
/// first: an empty result proves nothing was sent.
async fn settle(c: &mut Client) -> Vec<Value> {
    let r = fresh_ref("settle");
    c.send(json!({"type": "groups", "ref": r})).await;
    let mut seen = Vec::new();
    loop {
        let v = c.recv().await;
        if v["type"] == "groups" && v["ref"] == r.as_str() {
            return seen;
        }
        seen.push(v);
    }
}

fn of_type(frames: &[Value], ty: &str) -> Vec<Value> {
    frames.iter().filter(|f| f["type"] == ty).cloned().collect()
}

/// The next frame carrying `ref` (others are skipped).
async fn answer(c: &mut Client, r: &str) -> Value {
    loop {
        let v = c.recv().await;
        if v["ref"] == r {
            return v;
        }
    }
}

/// The session still answers: `ping` gets `pong` with the same ref.
async fn assert_open(c: &mut Client) {
    let r = fresh_ref("ping");
    c.send(json!({"type": "ping", "ref": r})).await;
    assert_eq!(answer(c, &r).await, json!({"type": "pong", "ref": r}));
}

/// Send a raw text frame; expect an `error` with `code` (and the frame's
/// ref, if given), then check the connection is still open.
async fn expect_error(c: &mut Client, text: &str, code: &str, r#ref: Option<&str>) {
    c.send_raw(Message::Text(text.to_string().into())).await;
    let e = c.recv_main().await;
    assert_eq!(e["type"], "error", "answer to {text}: {e}");
    assert_eq!(e["code"], code, "answer to {text}: {e}");
    assert!(e["message"].is_string(), "{e}");
    match r#ref {
        Some(r) => assert_eq!(e["ref"], r, "{e}"),
        None => assert!(e.get("ref").is_none_or(Value::is_null), "{e}"),
    }
    assert_open(c).await;
}

/// Send `frame` with a fresh ref and return the answer carrying that ref.
async fn request(c: &mut Client, mut frame: Value) -> Value {
    let r = fresh_ref("req");
    frame["ref"] = json!(r);
    c.send(frame).await;
    answer(c, &r).await
}

async fn send_to(c: &mut Client, to: Value, body: &str, client_id: Option<&str>) -> Value {
    let mut f = json!({"type": "send", "to": to, "body": body});
    if let Some(cid) = client_id {
        f["client_id"] = json!(cid);
    }
    request(c, f).await
}

/// Send and expect `sent`; its seq.
async fn sent_seq(c: &mut Client, to: Value, body: &str) -> i64 {
    let v = send_to(c, to, body, None).await;
    assert_eq!(v["type"], "sent", "{v}");
    v["seq"].as_i64().expect("seq")
}

async fn expect_code(c: &mut Client, frame: Value, code: &str) -> Value {
    let v = request(c, frame.clone()).await;
    assert_eq!(v["type"], "error", "answer to {frame}: {v}");
    assert_eq!(v["code"], code, "answer to {frame}: {v}");
    v
}

async fn history(c: &mut Client, conv: &str, before: Option<i64>, limit: Option<i64>) -> Value {
    let mut f = json!({"type": "history", "conv": conv});
    if let Some(b) = before {
        f["before_seq"] = json!(b);
    }
    if let Some(l) = limit {
        f["limit"] = json!(l);
    }
    request(c, f).await
}

fn seqs(messages: &[Value]) -> Vec<i64> {
    messages
        .iter()
        .map(|m| m["seq"].as_i64().expect("seq"))
        .collect()
}

fn history_seqs(h: &Value) -> Vec<i64> {
    assert_eq!(h["type"], "history", "{h}");
    seqs(h["messages"].as_array().expect("messages"))
}

/// Wait until `user`'s delivery position in `conv` is `seq`: acks are
/// applied in batches in the background (a batch in flight, the next one
/// queued), so no single request is a barrier for all of them.
async fn acked(db: &TestDb, conv: &str, user: &str, seq: i64) {
    use chat_hub::db::schema::members;
    use diesel::prelude::*;
    let pool = db.pool();
    eventually(&format!("{user}'s ack of {conv} at {seq}"), || {
        let pool = pool.clone();
        let (conv, user) = (conv.to_string(), user.to_string());
        async move {
            let Ok(mut c) = pool.get() else {
                return false;
            };
            members::table
                .find((conv, user))
                .select(members::delivered_seq)
                .first::<i64>(&mut *c)
                .is_ok_and(|d| d == seq)
        }
    })
    .await;
}

/// Backlog messages of one conversation, in the order they came.
fn conv_seqs(backlog: &[Value], conv: &str) -> Vec<i64> {
    seqs(
        &backlog
            .iter()
            .filter(|m| m["conv"] == conv)
            .cloned()
            .collect::<Vec<_>>(),
    )
}

async fn create_group(c: &mut Client, group: &str, members: &[&str]) -> Value {
    let v = request(
        c,
        json!({"type": "group_create", "group": group, "name": group, "members": members}),
    )
    .await;
    assert_eq!(
        (v["type"].as_str(), v["event"].as_str()),
        (Some("group"), Some("created")),
        "{v}"
    );
    v
}

/// A `ping` text frame of exactly `len` bytes (JSON padded with spaces).
fn padded_ping(r: &str, len: usize) -> String {
    let head = format!(r#"{{"type":"ping","ref":"{r}""#);
    let s = format!("{head}{}}}", " ".repeat(len - head.len() - 1));
    assert_eq!(s.len(), len);
    s
}

/// Send `text` as a fragmented text message in pieces of at most `piece` bytes.
async fn send_fragmented(c: &mut Client, text: &str, piece: usize) {
    let bytes = text.as_bytes();
    let chunks: Vec<&[u8]> = bytes.chunks(piece).collect();
    assert!(chunks.len() >= 3, "fragment into three or more frames");
    for (i, chunk) in chunks.iter().enumerate() {
        let op = if i == 0 {
            OpCode::Data(Data::Text)
        } else {
            OpCode::Data(Data::Continue)
        };
        let fin = i + 1 == chunks.len();
        c.send_raw(Message::Frame(Frame::message(chunk.to_vec(), op, fin)))
            .await;
    }
}

/// Frames until `synced`, all kept (welcome first).
async fn connect_all(s: &TestServer, user: &str) -> (Client, Vec<Value>) {
    let mut c = s.connect(user).await;
    let mut frames = vec![c.recv().await];
    assert_eq!(frames[0]["type"], "welcome", "{}", frames[0]);
    loop {
        let f = c.recv().await;
        let done = f["type"] == "synced";
        frames.push(f);
        if done {
            return (c, frames);
        }
    }
}

/// Read until the connection ends, within one overall deadline (server pings
/// would keep a per-frame timeout from ever firing): the close code if any.
async fn closed(c: &mut Client) -> Ended {
    let read = async {
        loop {
            match c.ws.next().await {
                Some(Ok(Message::Close(Some(f)))) => return Ended::Closed(u16::from(f.code)),
                Some(Ok(Message::Close(None))) => return Ended::Closed(1005),
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return Ended::Dropped,
            }
        }
    };
    tokio::time::timeout(WAIT, read)
        .await
        .expect("the connection ends in time")
}

/// The next presence frame (others skipped).
async fn next_presence(c: &mut Client) -> Value {
    c.recv_type("presence").await
}

/// `seqs` (as one session received them) hold 1..=n, in order except for
/// repeats of ones already received.
fn assert_in_order(seqs: &[i64], n: i64) {
    let mut seen = BTreeSet::new();
    let mut last = 0;
    for &q in seqs {
        if q <= last {
            assert!(seen.contains(&q), "seq {q} after {last}");
        } else {
            last = q;
        }
        seen.insert(q);
    }
    assert_eq!(
        seen.into_iter().collect::<Vec<_>>(),
        (1..=n).collect::<Vec<_>>()
    );
}

fn no_presence(frames: &[Value]) {
    assert!(
        of_type(frames, "presence").is_empty(),
        "unexpected presence: {frames:?}"
    );
}

backend_tests! {
    async fn tokens_and_origins_are_checked_before_the_upgrade(db) {
        let s = TestServer::start(db.config()).await;
        let base = format!("ws://{}/ws", s.addr);
        let now = now_secs();
        let k = &s.keys;
        let alice = chat_hub::ids::UserId::parse("alice").unwrap();
        let wrong = chat_hub::auth::TokenKeys::new("another-secret-0123456789").mint(&alice, 3600).unwrap();
        let hs512 = jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS512),
            &json!({"sub": "alice", "exp": now + 3600}),
            &jsonwebtoken::EncodingKey::from_secret(b"test-secret-0123456789abcdef"),
        )
        .unwrap();
        assert_eq!(ws_try_connect(&base, &[]).await.err(), Some(401), "no token");
        let refused = [
            ("bad signature", wrong),
            ("malformed", "not.a.jwt".to_string()),
            ("garbage", "xyz".to_string()),
            ("expired", k.mint_raw(&json!({"sub": "alice", "exp": now - 5}))),
            ("nbf in the future", k.mint_raw(&json!({"sub": "alice", "exp": now + 3600, "nbf": now + 600}))),
            ("sub not a user id", k.mint_raw(&json!({"sub": "al ice", "exp": now + 3600}))),
            ("sub too long", k.mint_raw(&json!({"sub": "a".repeat(65), "exp": now + 3600}))),
            ("no sub", k.mint_raw(&json!({"exp": now + 3600}))),
            ("no exp", k.mint_raw(&json!({"sub": "alice"}))),
            ("iat in the future", k.mint_raw(&json!({"sub": "alice", "exp": now + 3600, "iat": now + 600}))),
            ("HS512, not HS256", hs512),
        ];
        for (what, token) in &refused {
            assert_eq!(ws_try_connect(&format!("{base}?token={token}"), &[]).await.err(), Some(401), "{what} (query)");
            let h = format!("Bearer {token}");
            assert_eq!(ws_try_connect(&base, &[("Authorization", &h)]).await.err(), Some(401), "{what} (header)");
        }
        // The refusal is the contract's JSON error body.
        let upgrade = [
            ("Upgrade", "websocket"),
            ("Connection", "Upgrade"),
            ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
            ("Sec-WebSocket-Version", "13"),
        ];
        let (status, body) = http_request(s.addr, "GET", "/ws?token=not.a.jwt", &upgrade, "").await;
        assert_eq!(status, 401);
        let v: Value = serde_json::from_str(&body).expect("JSON error body");
        assert_eq!(v["code"], "unauthorized", "{v}");
        // Valid tokens, in the query (with nbf/iat in the past) and in the header.
        let ok = k.mint_raw(&json!({"sub": "alice", "exp": now + 3600, "nbf": now - 10, "iat": now - 10}));
        let mut c = ws_try_connect(&format!("{base}?token={ok}"), &[]).await.expect("valid token");
        assert_eq!(c.recv().await["user"], "alice");
        let h = format!("Bearer {}", s.token("bob"));
        let mut c = ws_try_connect(&base, &[("Authorization", &h)]).await.expect("bearer header");
        let w = c.recv().await;
        assert_eq!((w["type"].as_str(), w["user"].as_str()), (Some("welcome"), Some("bob")));
        // Any origin while none is configured.
        let mut c = ws_try_connect(&s.ws_url("carol"), &[("Origin", "https://anywhere.example")]).await.expect("any origin");
        assert_eq!(c.recv().await["type"], "welcome");

        let s = server_with(&db, |c| c.allowed_origins = vec!["https://chat.example".into(), "http://localhost:3000".into()]).await;
        let url = s.ws_url("alice");
        for bad in ["https://evil.example", "https://chat.example.evil", "null", "http://chat.example"] {
            assert_eq!(ws_try_connect(&url, &[("Origin", bad)]).await.err(), Some(403), "origin {bad}");
        }
        let (status, body) = http_request(s.addr, "GET", &format!("/ws?token={}", s.token("alice")), &[upgrade.as_slice(), &[("Origin", "https://evil.example")]].concat(), "").await;
        assert_eq!(status, 403);
        assert_eq!(serde_json::from_str::<Value>(&body).expect("JSON")["code"], "forbidden");
        for good in ["https://chat.example", "http://localhost:3000"] {
            let mut c = ws_try_connect(&url, &[("Origin", good)]).await.expect("allowed origin");
            assert_eq!(c.recv().await["type"], "welcome");
        }
        let mut c = ws_try_connect(&url, &[]).await.expect("no Origin header");
        assert_eq!(c.recv().await["type"], "welcome");
    }

    async fn welcome_then_synced(db) {
        let s = TestServer::start(db.config()).await;
        let before = chat_hub::now_ms();
        let mut c = s.connect("alice").await;
        let w = c.recv().await;
        let keys: BTreeSet<&str> = w.as_object().expect("object").keys().map(String::as_str).collect();
        assert_eq!(keys, BTreeSet::from(["type", "user", "session", "server_time", "protocol"]), "{w}");
        assert_eq!((w["type"].as_str(), w["user"].as_str(), w["protocol"].as_i64()), (Some("welcome"), Some("alice"), Some(1)));
        let session = uuid::Uuid::parse_str(w["session"].as_str().expect("session")).expect("a uuid");
        let t = w["server_time"].as_i64().expect("server_time in ms");
        assert!(t >= before - 60_000 && t <= chat_hub::now_ms() + 60_000, "server_time {t} is Unix ms");
        assert_eq!(c.recv().await, json!({"type": "synced"}));
        c.send(json!({"type": "ping"})).await;
        assert_eq!(c.recv().await, json!({"type": "pong"}));
        let mut c2 = s.connect("alice").await;
        let w2 = c2.recv().await;
        assert_ne!(uuid::Uuid::parse_str(w2["session"].as_str().unwrap()).unwrap(), session, "each session its own id");
        assert_eq!(c2.recv().await, json!({"type": "synced"}));
    }

    async fn direct_messages_reach_every_session_but_the_sending_one(db) {
        let s = TestServer::start(db.config()).await;
        let (mut a1, _) = s.connect_synced("alice").await;
        let (mut a2, _) = s.connect_synced("alice").await;
        let (mut b1, _) = s.connect_synced("bob").await;
        let (mut b2, _) = s.connect_synced("bob").await;
        let (mut carol, _) = s.connect_synced("carol").await;

        a1.send(json!({"type": "send", "ref": "r1", "to": {"user": "bob"}, "body": "hi bob", "client_id": "c-1", "from": "mallory"})).await;
        // The sending session's answer is `sent` (a copy of the message would have come first).
        let sent = a1.recv_main().await;
        assert_eq!(sent["type"], "sent", "{sent}");
        assert_eq!((sent["ref"].as_str(), sent["client_id"].as_str(), sent["conv"].as_str(), sent["seq"].as_i64()), (Some("r1"), Some("c-1"), Some("dm:alice:bob"), Some(1)));
        let ts = sent["ts"].as_i64().expect("ts");
        for c in [&mut b1, &mut b2, &mut a2] {
            let m = c.recv_main().await;
            assert_eq!(m, json!({"type": "message", "conv": "dm:alice:bob", "seq": 1, "from": "alice", "to": {"user": "bob"}, "body": "hi bob", "ts": ts, "client_id": "c-1"}));
        }
        assert!(of_type(&settle(&mut a1).await, "message").is_empty(), "the sending session gets no copy");
        assert!(of_type(&settle(&mut carol).await, "message").is_empty(), "a bystander gets nothing");

        // Seqs go on 2, 3 in the one conversation, whoever sends.
        assert_eq!(sent_seq(&mut a2, json!({"user": "bob"}), "second").await, 2);
        let m = a1.recv_main().await;
        assert_eq!((m["type"].as_str(), m["seq"].as_i64(), m["body"].as_str()), (Some("message"), Some(2), Some("second")));
        assert!(of_type(&settle(&mut a2).await, "message").is_empty());
        for c in [&mut b1, &mut b2] {
            assert_eq!(c.recv_main().await["seq"], 2);
        }
        let v = send_to(&mut b1, json!({"user": "alice"}), "hi alice", None).await;
        assert_eq!((v["conv"].as_str(), v["seq"].as_i64()), (Some("dm:alice:bob"), Some(3)));
        for c in [&mut a1, &mut a2, &mut b2] {
            let m = c.recv_main().await;
            assert_eq!((m["from"].as_str(), m["to"].clone(), m["seq"].as_i64()), (Some("bob"), json!({"user": "alice"}), Some(3)), "{m}");
        }
        assert!(of_type(&settle(&mut b1).await, "message").is_empty());

        // Self-DM: dm:alice:alice, to her other sessions only.
        let v = send_to(&mut a1, json!({"user": "alice"}), "note to self", None).await;
        assert_eq!((v["type"].as_str(), v["conv"].as_str(), v["seq"].as_i64()), (Some("sent"), Some("dm:alice:alice"), Some(1)));
        let m = a2.recv_main().await;
        assert_eq!((m["conv"].as_str(), m["to"].clone(), m["from"].as_str()), (Some("dm:alice:alice"), json!({"user": "alice"}), Some("alice")));
        assert!(of_type(&settle(&mut a1).await, "message").is_empty());
        assert!(of_type(&settle(&mut b1).await, "message").is_empty());

        // Keys are in byte order: "Zed" < "amy".
        let (mut amy, _) = s.connect_synced("amy").await;
        let (mut zed, _) = s.connect_synced("Zed").await;
        let v = send_to(&mut amy, json!({"user": "Zed"}), "hey", None).await;
        assert_eq!(v["conv"], "dm:Zed:amy");
        assert_eq!(zed.recv_main().await["conv"], "dm:Zed:amy");
    }

    async fn group_messages_reach_every_member_but_the_sending_session(db) {
        let s = TestServer::start(db.config()).await;
        let (mut a1, _) = s.connect_synced("alice").await;
        let (mut a2, _) = s.connect_synced("alice").await;
        let (mut bob, _) = s.connect_synced("bob").await;
        let (mut carol, _) = s.connect_synced("carol").await;
        let (mut dave, _) = s.connect_synced("dave").await;
        create_group(&mut a1, "team", &["bob", "carol"]).await;
        for c in [&mut a2, &mut bob, &mut carol] {
            assert_eq!(c.recv_type("group").await["event"], "created");
        }
        let v = send_to(&mut a1, json!({"group": "team"}), "hi all", Some("g-1")).await;
        assert_eq!((v["type"].as_str(), v["conv"].as_str(), v["seq"].as_i64(), v["client_id"].as_str()), (Some("sent"), Some("group:team"), Some(1), Some("g-1")));
        for c in [&mut a2, &mut bob, &mut carol] {
            let m = c.recv_main().await;
            assert_eq!(m, json!({"type": "message", "conv": "group:team", "seq": 1, "from": "alice", "to": {"group": "team"}, "body": "hi all", "ts": v["ts"], "client_id": "g-1"}));
        }
        assert!(of_type(&settle(&mut a1).await, "message").is_empty());
        assert!(of_type(&settle(&mut dave).await, "message").is_empty(), "a non-member gets nothing");
        assert_eq!(sent_seq(&mut bob, json!({"group": "team"}), "from bob").await, 2);
        for c in [&mut a1, &mut a2, &mut carol] {
            let m = c.recv_main().await;
            assert_eq!((m["from"].as_str(), m["seq"].as_i64()), (Some("bob"), Some(2)));
        }
        // A non-member's send is forbidden and goes nowhere.
        expect_code(&mut dave, json!({"type": "send", "to": {"group": "team"}, "body": "let me in"}), "forbidden").await;
        assert!(of_type(&settle(&mut bob).await, "message").is_empty());
        expect_code(&mut dave, json!({"type": "send", "to": {"group": "nosuch"}, "body": "x"}), "not_found").await;
        assert_eq!(sent_seq(&mut carol, json!({"group": "team"}), "third").await, 3, "refused sends took no seq");
    }

    async fn a_resend_with_the_same_client_id_is_not_stored_again(db) {
        let s = TestServer::start(db.config()).await;
        let (mut a1, _) = s.connect_synced("alice").await;
        let (mut a2, _) = s.connect_synced("alice").await;
        let (mut bob, _) = s.connect_synced("bob").await;
        let (mut carol, _) = s.connect_synced("carol").await;
        let (mut a3, _) = s.connect_synced("alice").await;
        assert_eq!(sent_seq(&mut a1, json!({"user": "bob"}), "zero").await, 1);
        let first = send_to(&mut a1, json!({"user": "bob"}), "once", Some("dup-1")).await;
        assert_eq!((first["conv"].as_str(), first["seq"].as_i64()), (Some("dm:alice:bob"), Some(2)));
        // Again from the same session, from another session, with another body, to another user.
        for (which, to, body) in [(1, "bob", "once"), (2, "bob", "once"), (1, "bob", "changed"), (2, "carol", "elsewhere")] {
            let c = if which == 1 { &mut a1 } else { &mut a2 };
            let again = send_to(c, json!({"user": to}), body, Some("dup-1")).await;
            assert_eq!(again["type"], "sent", "{again}");
            assert_eq!((again["conv"].as_str(), again["seq"].as_i64(), again["client_id"].as_str()), (Some("dm:alice:bob"), Some(2), Some("dup-1")));
            assert_eq!(again["ts"], first["ts"]);
        }
        let got = of_type(&settle(&mut bob).await, "message");
        assert_eq!(seqs(&got), vec![1, 2], "delivered once: {got:?}");
        assert!(of_type(&settle(&mut carol).await, "message").is_empty());
        // alice's session that sent nothing saw the message once, too.
        assert_eq!(seqs(&of_type(&settle(&mut a3).await, "message")), vec![1, 2]);
        let h = history(&mut bob, "dm:alice:bob", None, None).await;
        assert_eq!(history_seqs(&h), vec![2, 1]);
        assert_eq!(h["messages"][0]["body"], "once");
        // The key is the user's: bob may use the same client_id for a message of his own.
        let v = send_to(&mut bob, json!({"user": "alice"}), "mine", Some("dup-1")).await;
        assert_eq!((v["conv"].as_str(), v["seq"].as_i64()), (Some("dm:alice:bob"), Some(3)));
        // The next new message continues the sequence: no number was used up.
        assert_eq!(sent_seq(&mut a1, json!({"user": "bob"}), "next").await, 4);
    }

    async fn offline_delivery_backlog_and_acks(db) {
        let s = server_with(&db, |c| c.db_threads = 1).await;
        let (mut a, _) = s.connect_synced("alice").await;
        let (mut carol, _) = s.connect_synced("carol").await;
        for i in 1..=5 {
            assert_eq!(sent_seq(&mut a, json!({"user": "bob"}), &format!("a{i}")).await, i);
        }
        for i in 1..=2 {
            assert_eq!(sent_seq(&mut carol, json!({"user": "bob"}), &format!("c{i}")).await, i);
        }
        // Everything unacknowledged comes before `synced`, in seq order per conversation.
        let (mut b, backlog) = s.connect_synced("bob").await;
        assert_eq!(backlog.len(), 7, "{backlog:?}");
        assert_eq!(conv_seqs(&backlog, "dm:alice:bob"), vec![1, 2, 3, 4, 5]);
        assert_eq!(conv_seqs(&backlog, "dm:bob:carol"), vec![1, 2]);
        let m = backlog.iter().find(|m| m["conv"] == "dm:alice:bob" && m["seq"] == 3).unwrap();
        assert_eq!((m["from"].as_str(), m["body"].as_str(), m["to"].clone()), (Some("alice"), Some("a3"), json!({"user": "bob"})));
        // An ack never moves backwards.
        b.send(json!({"type": "ack", "conv": "dm:alice:bob", "seq": 3})).await;
        b.send(json!({"type": "ack", "conv": "dm:alice:bob", "seq": 1})).await;
        b.send(json!({"type": "ack", "conv": "dm:bob:carol", "seq": 2})).await;
        b.send(json!({"type": "ack", "conv": "dm:bob:carol", "seq": 0})).await;
        acked(&db, "dm:alice:bob", "bob", 3).await;
        acked(&db, "dm:bob:carol", "bob", 2).await;
        assert!(of_type(&settle(&mut b).await, "error").is_empty(), "acks get no reply");
        b.close().await;
        sessions_become(&s, 2).await;
        let (mut b, backlog) = s.connect_synced("bob").await;
        assert_eq!(conv_seqs(&backlog, "dm:alice:bob"), vec![4, 5]);
        assert_eq!(backlog.len(), 2, "{backlog:?}");
        // Acks beyond the last seq, of a conversation never joined, or malformed.
        for (conv, seq) in [("dm:alice:bob", 6), ("dm:bob:zed", 1), ("group:nosuch", 1), ("dm:bob:alice", 1), ("dm:alice:carol", 1)] {
            let r = fresh_ref("ack");
            let f = json!({"type": "ack", "ref": r, "conv": conv, "seq": seq}).to_string();
            expect_error(&mut b, &f, "bad_request", Some(&r)).await;
        }
        b.send(json!({"type": "ack", "conv": "dm:alice:bob", "seq": 5})).await;
        acked(&db, "dm:alice:bob", "bob", 5).await;
        b.close().await;
        sessions_become(&s, 2).await;
        let (mut b, backlog) = s.connect_synced("bob").await;
        assert!(backlog.is_empty(), "all acked: {backlog:?}");
        // A user's own messages are not in their backlog.
        a.close().await;
        sessions_become(&s, 2).await;
        let (mut a, backlog) = s.connect_synced("alice").await;
        assert!(backlog.is_empty(), "alice's own messages came back: {backlog:?}");
        assert_eq!(sent_seq(&mut b, json!({"user": "alice"}), "b1").await, 6);
        assert_eq!(a.recv_main().await["seq"], 6);
        a.close().await;
        b.close().await;
        sessions_become(&s, 1).await;
        let (_a, backlog) = s.connect_synced("alice").await;
        assert_eq!(conv_seqs(&backlog, "dm:alice:bob"), vec![6]);
        assert_eq!(backlog.len(), 1);
        let (_b, backlog) = s.connect_synced("bob").await;
        assert!(backlog.is_empty(), "bob's own message came back: {backlog:?}");
    }

    async fn history_pages_and_permissions(db) {
        let s = server_with(&db, |c| c.rate_burst = 1000).await;
        let (mut a, _) = s.connect_synced("alice").await;
        let (mut b, _) = s.connect_synced("bob").await;
        let (mut c, _) = s.connect_synced("carol").await;
        for i in 1..=5 {
            sent_seq(&mut a, json!({"user": "bob"}), &format!("m{i}")).await;
        }
        let h = history(&mut a, "dm:alice:bob", None, Some(2)).await;
        assert_eq!((history_seqs(&h), h["more"].as_bool(), h["conv"].as_str()), (vec![5, 4], Some(true), Some("dm:alice:bob")));
        let m = &h["messages"][0];
        assert_eq!((m["from"].as_str(), m["body"].as_str(), m["to"].clone(), m["conv"].as_str()), (Some("alice"), Some("m5"), json!({"user": "bob"}), Some("dm:alice:bob")));
        assert!(m["ts"].is_i64());
        assert!(m.get("client_id").is_none(), "no client_id given: {m}");
        let h = history(&mut a, "dm:alice:bob", Some(4), Some(2)).await;
        assert_eq!((history_seqs(&h), h["more"].as_bool()), (vec![3, 2], Some(true)));
        let h = history(&mut a, "dm:alice:bob", Some(2), Some(2)).await;
        assert_eq!((history_seqs(&h), h["more"].as_bool()), (vec![1], Some(false)));
        let h = history(&mut b, "dm:alice:bob", None, None).await;
        assert_eq!((history_seqs(&h), h["more"].as_bool()), (vec![5, 4, 3, 2, 1], Some(false)));
        let h = history(&mut b, "dm:alice:bob", None, Some(200)).await;
        assert_eq!(history_seqs(&h), vec![5, 4, 3, 2, 1]);
        let h = history(&mut b, "dm:alice:bob", Some(1), None).await;
        assert_eq!((history_seqs(&h), h["more"].as_bool()), (vec![], Some(false)));
        for (limit, conv) in [(0, "dm:alice:bob"), (201, "dm:alice:bob"), (10, "dm:bob:alice"), (10, "chan:x")] {
            expect_code(&mut a, json!({"type": "history", "conv": conv, "limit": limit}), "bad_request").await;
        }
        expect_code(&mut c, json!({"type": "history", "conv": "dm:alice:bob"}), "forbidden").await;
        expect_code(&mut c, json!({"type": "history", "conv": "group:nosuch"}), "not_found").await;
        // The default page is 50.
        for i in 1..=60 {
            c.send(json!({"type": "send", "to": {"user": "dave"}, "body": format!("d{i}")})).await;
        }
        let mut n = 0;
        while n < 60 {
            if c.recv_main().await["type"] == "sent" {
                n += 1;
            }
        }
        let h = history(&mut c, "dm:carol:dave", None, None).await;
        assert_eq!((history_seqs(&h), h["more"].as_bool()), ((11..=60).rev().collect::<Vec<_>>(), Some(true)));
        // Groups: members only, and only from their join on.
        create_group(&mut a, "team", &["bob"]).await;
        for i in 1..=3 {
            assert_eq!(sent_seq(&mut a, json!({"group": "team"}), &format!("g{i}")).await, i);
        }
        expect_code(&mut c, json!({"type": "history", "conv": "group:team"}), "forbidden").await;
        let v = request(&mut a, json!({"type": "group_add", "group": "team", "user": "carol"})).await;
        assert_eq!(v["event"], "added", "{v}");
        for i in 4..=5 {
            assert_eq!(sent_seq(&mut a, json!({"group": "team"}), &format!("g{i}")).await, i);
        }
        let h = history(&mut c, "group:team", None, None).await;
        assert_eq!((history_seqs(&h), h["more"].as_bool()), (vec![5, 4], Some(false)));
        let h = history(&mut c, "group:team", None, Some(1)).await;
        assert_eq!((history_seqs(&h), h["more"].as_bool()), (vec![5], Some(true)));
        let h = history(&mut c, "group:team", Some(5), Some(10)).await;
        assert_eq!((history_seqs(&h), h["more"].as_bool()), (vec![4], Some(false)));
        let h = history(&mut b, "group:team", None, None).await;
        assert_eq!(history_seqs(&h), vec![5, 4, 3, 2, 1]);
        // A former member no longer reads the group.
        let v = request(&mut b, json!({"type": "group_leave", "group": "team"})).await;
        assert_eq!(v["event"], "left", "{v}");
        expect_code(&mut b, json!({"type": "history", "conv": "group:team"}), "forbidden").await;
    }

    async fn typing_reaches_the_others_only(db) {
        let s = TestServer::start(db.config()).await;
        let (mut a1, _) = s.connect_synced("alice").await;
        let (mut a2, _) = s.connect_synced("alice").await;
        let (mut b1, _) = s.connect_synced("bob").await;
        let (mut b2, _) = s.connect_synced("bob").await;
        let (mut carol, _) = s.connect_synced("carol").await;
        let (mut dave, _) = s.connect_synced("dave").await;
        a1.send(json!({"type": "typing", "to": {"user": "bob"}})).await;
        for c in [&mut b1, &mut b2] {
            assert_eq!(c.recv_type("typing").await, json!({"type": "typing", "conv": "dm:alice:bob", "from": "alice"}));
        }
        assert!(of_type(&settle(&mut a1).await, "typing").is_empty());
        assert!(of_type(&settle(&mut carol).await, "typing").is_empty());
        create_group(&mut a1, "team", &["bob", "carol"]).await;
        a1.send(json!({"type": "typing", "to": {"group": "team"}})).await;
        for c in [&mut b1, &mut b2, &mut carol] {
            assert_eq!(c.recv_type("typing").await, json!({"type": "typing", "conv": "group:team", "from": "alice"}));
        }
        assert!(of_type(&settle(&mut a1).await, "typing").is_empty(), "not to the sender");
        assert!(of_type(&settle(&mut a2).await, "typing").is_empty(), "not to the sender's other sessions");
        assert!(of_type(&settle(&mut dave).await, "typing").is_empty(), "not to non-members");
        expect_code(&mut dave, json!({"type": "typing", "to": {"group": "team"}}), "forbidden").await;
        expect_code(&mut dave, json!({"type": "typing", "to": {"group": "nosuch"}}), "not_found").await;
        assert!(of_type(&settle(&mut b1).await, "typing").is_empty());
        // Typing is not stored.
        let h = history(&mut b1, "group:team", None, None).await;
        assert_eq!(history_seqs(&h), Vec::<i64>::new());
    }

    async fn presence_follows_first_and_last_session(db) {
        let s = TestServer::start(db.config()).await;
        let (mut a, _) = s.connect_synced("alice").await;
        // alice—bob: a DM with a message; alice—carol: a group; dave—erin: a group of their own.
        sent_seq(&mut a, json!({"user": "bob"}), "hello").await;
        create_group(&mut a, "g1", &["carol"]).await;
        let (mut e, _) = s.connect_synced("erin").await;
        create_group(&mut e, "g2", &["dave"]).await;
        no_presence(&settle(&mut a).await);

        let (b1, _) = connect_all(&s, "bob").await;
        assert_eq!(next_presence(&mut a).await, json!({"type": "presence", "user": "bob", "online": true}));
        let (b2, _) = connect_all(&s, "bob").await;
        no_presence(&settle(&mut a).await);
        b1.close().await;
        sessions_become(&s, 3).await;
        no_presence(&settle(&mut a).await);
        b2.close().await;
        assert_eq!(next_presence(&mut a).await, json!({"type": "presence", "user": "bob", "online": false}));

        let (_carol, _) = connect_all(&s, "carol").await;
        assert_eq!(next_presence(&mut a).await, json!({"type": "presence", "user": "carol", "online": true}));
        let (dave, _) = connect_all(&s, "dave").await;
        assert_eq!(next_presence(&mut e).await, json!({"type": "presence", "user": "dave", "online": true}));
        no_presence(&settle(&mut a).await);

        // A first DM message between two online users makes them contacts.
        let (mut frank, _) = connect_all(&s, "frank").await;
        no_presence(&settle(&mut a).await);
        sent_seq(&mut frank, json!({"user": "alice"}), "hi, I'm frank").await;
        assert_eq!(next_presence(&mut a).await, json!({"type": "presence", "user": "frank", "online": true}));
        frank.close().await;
        assert_eq!(next_presence(&mut a).await, json!({"type": "presence", "user": "frank", "online": false}));
        dave.close().await;
        assert_eq!(next_presence(&mut e).await, json!({"type": "presence", "user": "dave", "online": false}));
        no_presence(&settle(&mut a).await);
    }

    async fn group_create_and_list(db) {
        let s = TestServer::start(db.config()).await;
        let (mut a1, _) = s.connect_synced("alice").await;
        let (mut a2, _) = s.connect_synced("alice").await;
        let (mut bob, _) = s.connect_synced("bob").await;
        let (mut carol, _) = s.connect_synced("carol").await;
        let (mut dave, _) = s.connect_synced("dave").await;
        a1.send(json!({"type": "group_create", "ref": "g1", "group": "team", "name": "Team", "members": ["carol", "bob"]})).await;
        let created = json!({"type": "group", "event": "created", "group": "team", "name": "Team", "owner": "alice", "members": ["alice", "bob", "carol"], "by": "alice"});
        let mut with_ref = created.clone();
        with_ref["ref"] = json!("g1");
        assert_eq!(answer(&mut a1, "g1").await, with_ref);
        for c in [&mut a2, &mut bob, &mut carol] {
            assert_eq!(c.recv_type("group").await, created, "other copies carry no ref");
        }
        assert!(of_type(&settle(&mut dave).await, "group").is_empty());
        assert!(of_type(&settle(&mut a1).await, "group").is_empty(), "one copy for the requester");
        // An existing group: conflict, whoever asks.
        for c in [&mut a1, &mut bob, &mut dave] {
            expect_code(c, json!({"type": "group_create", "group": "team", "name": "Again"}), "conflict").await;
        }
        let l = request(&mut bob, json!({"type": "groups"})).await;
        assert_eq!(l["type"], "groups");
        assert_eq!(l["groups"], json!([{"group": "team", "name": "Team", "owner": "alice", "members": ["alice", "bob", "carol"]}]));
        let l = request(&mut dave, json!({"type": "groups"})).await;
        assert_eq!(l["groups"], json!([]));
        create_group(&mut dave, "dave-only", &[]).await;
        let l = request(&mut dave, json!({"type": "groups"})).await;
        assert_eq!(l["groups"], json!([{"group": "dave-only", "name": "dave-only", "owner": "dave", "members": ["dave"]}]));
        let l = request(&mut a2, json!({"type": "groups"})).await;
        assert_eq!(l["groups"].as_array().unwrap().len(), 1, "{l}");
    }

    async fn group_membership_rules(db) {
        let s = TestServer::start(db.config()).await;
        let (mut a, _) = s.connect_synced("alice").await;
        let (mut b, _) = s.connect_synced("bob").await;
        let (mut c, _) = s.connect_synced("carol").await;
        let (mut d, _) = s.connect_synced("dave").await;
        let (mut e, _) = s.connect_synced("erin").await;
        create_group(&mut a, "team", &["bob", "carol"]).await;
        b.recv_type("group").await;
        c.recv_type("group").await;
        // Not the owner: forbidden, before conflict or not_found of the member.
        for f in [
            json!({"type": "group_add", "group": "team", "user": "dave"}),
            json!({"type": "group_add", "group": "team", "user": "carol"}),
            json!({"type": "group_remove", "group": "team", "user": "carol"}),
            json!({"type": "group_remove", "group": "team", "user": "dave"}),
            json!({"type": "group_remove", "group": "team", "user": "alice"}),
        ] {
            expect_code(&mut b, f.clone(), "forbidden").await;
            expect_code(&mut e, f, "forbidden").await;
        }
        // The owner adds: every member, the new one included, gets the event.
        let v = request(&mut a, json!({"type": "group_add", "group": "team", "user": "dave"})).await;
        let added = json!({"type": "group", "event": "added", "group": "team", "user": "dave", "by": "alice"});
        assert!(v["ref"].is_string(), "{v}");
        let mut v2 = v.clone();
        v2.as_object_mut().unwrap().remove("ref");
        assert_eq!(v2, added);
        for x in [&mut b, &mut c, &mut d] {
            assert_eq!(x.recv_type("group").await, added);
        }
        assert!(of_type(&settle(&mut e).await, "group").is_empty());
        expect_code(&mut a, json!({"type": "group_add", "group": "team", "user": "dave"}), "conflict").await;
        expect_code(&mut a, json!({"type": "group_remove", "group": "team", "user": "erin"}), "not_found").await;
        expect_code(&mut a, json!({"type": "group_remove", "group": "team", "user": "alice"}), "forbidden").await;
        expect_code(&mut a, json!({"type": "group_leave", "group": "team"}), "forbidden").await;
        expect_code(&mut e, json!({"type": "group_leave", "group": "team"}), "forbidden").await;
        for f in [
            json!({"type": "group_add", "group": "nosuch", "user": "dave"}),
            json!({"type": "group_remove", "group": "nosuch", "user": "dave"}),
            json!({"type": "group_leave", "group": "nosuch"}),
            json!({"type": "send", "to": {"group": "nosuch"}, "body": "x"}),
            json!({"type": "typing", "to": {"group": "nosuch"}}),
        ] {
            expect_code(&mut a, f, "not_found").await;
        }
        // Removal: the removed user gets the event too.
        let v = request(&mut a, json!({"type": "group_remove", "group": "team", "user": "dave"})).await;
        assert_eq!((v["event"].as_str(), v["user"].as_str(), v["by"].as_str()), (Some("removed"), Some("dave"), Some("alice")), "{v}");
        let removed = json!({"type": "group", "event": "removed", "group": "team", "user": "dave", "by": "alice"});
        for x in [&mut b, &mut c, &mut d] {
            assert_eq!(x.recv_type("group").await, removed);
        }
        // Leaving: the leaver gets the event too.
        let v = request(&mut b, json!({"type": "group_leave", "group": "team"})).await;
        let left = json!({"type": "group", "event": "left", "group": "team", "user": "bob", "by": "bob"});
        let mut v2 = v.clone();
        v2.as_object_mut().unwrap().remove("ref");
        assert_eq!(v2, left);
        for x in [&mut a, &mut c] {
            assert_eq!(x.recv_type("group").await, left);
        }
        assert!(of_type(&settle(&mut d).await, "group").is_empty(), "a former member hears no more");
        expect_code(&mut b, json!({"type": "send", "to": {"group": "team"}, "body": "still here?"}), "forbidden").await;
        expect_code(&mut b, json!({"type": "group_leave", "group": "team"}), "forbidden").await;
        let l = request(&mut b, json!({"type": "groups"})).await;
        assert_eq!(l["groups"], json!([]));
        let l = request(&mut c, json!({"type": "groups"})).await;
        assert_eq!(l["groups"][0]["members"], json!(["alice", "carol"]));
        // The owner can add a former member back.
        let v = request(&mut a, json!({"type": "group_add", "group": "team", "user": "bob"})).await;
        assert_eq!(v["event"], "added", "{v}");
        assert_eq!(sent_seq(&mut b, json!({"group": "team"}), "back").await, 1);
    }

    async fn a_former_member_keeps_the_backlog_of_their_membership(db) {
        let s = server_with(&db, |c| c.db_threads = 1).await;
        let (mut a, _) = s.connect_synced("alice").await;
        let (mut c, _) = s.connect_synced("carol").await;
        create_group(&mut a, "team", &["bob", "carol"]).await;
        c.recv_type("group").await;
        assert_eq!(sent_seq(&mut a, json!({"group": "team"}), "m1").await, 1);
        assert_eq!(sent_seq(&mut a, json!({"group": "team"}), "m2").await, 2);
        assert_eq!(seqs(&of_type(&settle(&mut c).await, "message")), vec![1, 2]);
        let v = request(&mut a, json!({"type": "group_remove", "group": "team", "user": "bob"})).await;
        assert_eq!(v["event"], "removed", "{v}");
        // dave joins (offline) now: only what comes from here on is his.
        let v = request(&mut a, json!({"type": "group_add", "group": "team", "user": "dave"})).await;
        assert_eq!(v["event"], "added", "{v}");
        let v = request(&mut c, json!({"type": "group_leave", "group": "team"})).await;
        assert_eq!(v["event"], "left", "{v}");
        assert_eq!(sent_seq(&mut a, json!({"group": "team"}), "m3").await, 3);
        assert!(of_type(&settle(&mut c).await, "message").is_empty(), "nothing after leaving");
        expect_code(&mut c, json!({"type": "send", "to": {"group": "team"}, "body": "x"}), "forbidden").await;
        c.close().await;
        sessions_become(&s, 1).await;
        // Both still get what was stored while they were members, and only that.
        for user in ["bob", "carol"] {
            let (_x, backlog) = s.connect_synced(user).await;
            assert_eq!(conv_seqs(&backlog, "group:team"), vec![1, 2], "{user}: {backlog:?}");
            assert_eq!(backlog.len(), 2);
        }
        sessions_become(&s, 1).await;
        let (mut b, _) = s.connect_synced("bob").await;
        expect_code(&mut b, json!({"type": "ack", "conv": "group:team", "seq": 3}), "bad_request").await;
        b.send(json!({"type": "ack", "conv": "group:team", "seq": 2})).await;
        acked(&db, "group:team", "bob", 2).await;
        b.close().await;
        sessions_become(&s, 1).await;
        let (_b, backlog) = s.connect_synced("bob").await;
        assert!(backlog.is_empty(), "acked: {backlog:?}");
        let (_c, backlog) = s.connect_synced("carol").await;
        assert_eq!(conv_seqs(&backlog, "group:team"), vec![1, 2], "until acked");
        let (_d, backlog) = s.connect_synced("dave").await;
        assert_eq!(conv_seqs(&backlog, "group:team"), vec![3], "a late member gets only what came after joining");
    }

    async fn a_re_added_member_still_gets_what_they_had_not_acknowledged(db) {
        let s = TestServer::start(db.config()).await;
        let (mut a, _) = s.connect_synced("alice").await;
        create_group(&mut a, "team", &["bob"]).await;
        assert_eq!(sent_seq(&mut a, json!({"group": "team"}), "m1").await, 1);
        let v = request(&mut a, json!({"type": "group_remove", "group": "team", "user": "bob"})).await;
        assert_eq!(v["event"], "removed", "{v}");
        assert_eq!(sent_seq(&mut a, json!({"group": "team"}), "m2").await, 2);
        let v = request(&mut a, json!({"type": "group_add", "group": "team", "user": "bob"})).await;
        assert_eq!(v["event"], "added", "{v}");
        assert_eq!(sent_seq(&mut a, json!({"group": "team"}), "m3").await, 3);
        // bob never acknowledged m1, stored while he was a member: it is still his,
        // as is m3; m2 (stored while he was out) is not.
        let (_b, backlog) = s.connect_synced("bob").await;
        assert_eq!(conv_seqs(&backlog, "group:team"), vec![1, 3], "{backlog:?}");
    }

    async fn a_long_backlog_comes_complete_and_in_order(db) {
        let s = server_with(&db, |c| {
            c.rate_per_sec = 1e6;
            c.rate_burst = 1_000_000;
        })
        .await;
        let (mut a, _) = s.connect_synced("alice").await;
        let (mut c, _) = s.connect_synced("carol").await;
        // More than one backlog page (2000) from two conversations.
        const N: i64 = 1300;
        for (who, n) in [(&mut a, N), (&mut c, N)] {
            let mut done = 0;
            while done < n {
                let k = (n - done).min(100);
                for i in 0..k {
                    who.send(json!({"type": "send", "to": {"user": "bob"}, "body": format!("m{}", done + i)})).await;
                }
                for _ in 0..k {
                    let v = who.recv_main().await;
                    assert_eq!(v["type"], "sent", "{v}");
                }
                done += k;
            }
        }
        // Live messages sent while bob syncs come after the backlog of their conversation.
        let mut b = s.connect("bob").await;
        for i in 0..20 {
            a.send(json!({"type": "send", "to": {"user": "bob"}, "body": format!("live{i}")})).await;
        }
        let mut got: BTreeMap<String, Vec<i64>> = BTreeMap::new();
        let mut unique: BTreeMap<String, BTreeSet<i64>> = BTreeMap::new();
        let mut synced = false;
        while unique.get("dm:alice:bob").map_or(0, BTreeSet::len) < (N + 20) as usize || !synced {
            let v = b.recv().await;
            match v["type"].as_str() {
                Some("message") => {
                    let conv = v["conv"].as_str().unwrap().to_string();
                    let seq = v["seq"].as_i64().unwrap();
                    got.entry(conv.clone()).or_default().push(seq);
                    unique.entry(conv).or_default().insert(seq);
                }
                Some("synced") => synced = true,
                _ => {}
            }
        }
        assert_in_order(&got["dm:alice:bob"], N + 20);
        assert_in_order(&got["dm:bob:carol"], N);
    }

    async fn concurrent_senders_into_one_group(db) {
        let s = server_with(&db, |c| {
            c.rate_per_sec = 1e6;
            c.rate_burst = 1_000_000;
        })
        .await;
        let (mut owner, _) = s.connect_synced("owner").await;
        create_group(&mut owner, "crowd", &["s0", "s1", "s2", "watcher"]).await;
        let (mut watcher, _) = s.connect_synced("watcher").await;
        const N: usize = 100;
        let sender = |i: usize| {
            let s = &s;
            async move {
                let (mut c, _) = s.connect_synced(&format!("s{i}")).await;
                for k in 0..N {
                    c.send(json!({"type": "send", "to": {"group": "crowd"}, "body": format!("{i}/{k}")})).await;
                }
                let mut seqs = Vec::new();
                while seqs.len() < N {
                    let v = c.recv_main().await;
                    match v["type"].as_str() {
                        Some("sent") => seqs.push(v["seq"].as_i64().unwrap()),
                        Some("message") => {}
                        _ => panic!("{v}"),
                    }
                }
                assert!(seqs.windows(2).all(|w| w[0] < w[1]), "one sender's messages keep their order: {seqs:?}");
                seqs
            }
        };
        let (a, b, c) = futures_util::future::join3(sender(0), sender(1), sender(2)).await;
        let mut all: Vec<i64> = [a, b, c].concat();
        all.sort();
        assert_eq!(all, (1..=3 * N as i64).collect::<Vec<_>>());
        // A member sees all of them once, in seq order.
        let mut seen = Vec::new();
        while seen.len() < 3 * N {
            let v = watcher.recv_main().await;
            if v["type"] == "message" {
                seen.push(v["seq"].as_i64().unwrap());
            }
        }
        assert_eq!(seen, (1..=3 * N as i64).collect::<Vec<_>>());
    }

    async fn malformed_frames_are_answered_and_the_connection_stays(db) {
        let s = TestServer::start(db.config()).await;
        let (mut c, _) = s.connect_synced("alice").await;
        let cases: Vec<(String, &str, Option<&str>)> = vec![
            ("not json".into(), "bad_request", None),
            ("[1,2]".into(), "bad_request", None),
            ("\"ping\"".into(), "bad_request", None),
            (r#"{"type":"fly","ref":"u1"}"#.into(), "unknown_type", Some("u1")),
            (r#"{"ref":"m1"}"#.into(), "bad_request", Some("m1")),
            (r#"{"type":"send","ref":"s1","to":{"user":"bob"}}"#.into(), "bad_request", Some("s1")),
            (r#"{"type":"send","ref":"s2","to":{"user":"al ice"},"body":"x"}"#.into(), "bad_request", Some("s2")),
            (r#"{"type":"send","ref":"s3","to":{"group":"te/am"},"body":"x"}"#.into(), "bad_request", Some("s3")),
            (json!({"type": "send", "ref": "s4", "to": {"user": "a".repeat(65)}, "body": "x"}).to_string(), "bad_request", Some("s4")),
            (r#"{"type":"send","ref":"s5","to":{"user":"bob","group":"x"},"body":"x"}"#.into(), "bad_request", Some("s5")),
            (r#"{"type":"send","ref":"s6","to":{"user":"bob"},"body":""}"#.into(), "bad_request", Some("s6")),
            (r#"{"type":"send","ref":"s7","to":{"user":""},"body":"x"}"#.into(), "bad_request", Some("s7")),
            (json!({"type": "send", "ref": "b1", "to": {"user": "bob"}, "body": "x".repeat(4097)}).to_string(), "too_large", Some("b1")),
            (json!({"type": "send", "ref": "b2", "to": {"user": "bob"}, "body": "é".repeat(2049)}).to_string(), "too_large", Some("b2")),
            (json!({"type": "send", "ref": "c1", "to": {"user": "bob"}, "body": "x", "client_id": "c".repeat(65)}).to_string(), "bad_request", Some("c1")),
            (json!({"type": "ping", "ref": "r".repeat(65)}).to_string(), "bad_request", None),
            (r#"{"type":"ack","ref":"k1","conv":"dm:bob:alice","seq":1}"#.into(), "bad_request", Some("k1")),
            (r#"{"type":"ack","ref":"k2","conv":"dm:alice:bob","seq":-1}"#.into(), "bad_request", Some("k2")),
            (r#"{"type":"ack","ref":"k3","conv":"dm:alice:bob","seq":"1"}"#.into(), "bad_request", Some("k3")),
            (r#"{"type":"history","ref":"h1","conv":"chan:x"}"#.into(), "bad_request", Some("h1")),
            (r#"{"type":"group_create","ref":"g1","group":"te am"}"#.into(), "bad_request", Some("g1")),
            (r#"{"type":"group_create","ref":"g2","group":"team","members":["ok","b d"]}"#.into(), "bad_request", Some("g2")),
            (r#"{"type":"group_add","ref":"g3","group":"team","user":""}"#.into(), "bad_request", Some("g3")),
            (r#"{"type":"typing","ref":"t1","to":{"user":"x y"}}"#.into(), "bad_request", Some("t1")),
        ];
        for (text, code, r) in &cases {
            expect_error(&mut c, text, code, *r).await;
        }
        // At the limits: a body of exactly max_body_bytes (UTF-8 bytes), a client_id of 64 characters.
        let v = send_to(&mut c, json!({"user": "bob"}), &"é".repeat(2048), None).await;
        assert_eq!(v["type"], "sent", "4096 bytes is accepted");
        let v = send_to(&mut c, json!({"user": "bob"}), "x", Some(&"c".repeat(64))).await;
        assert_eq!(v["type"], "sent", "{v}");
        let h = history(&mut c, "dm:alice:bob", None, None).await;
        assert_eq!(history_seqs(&h), vec![2, 1], "nothing else was stored");
    }

    async fn frame_size_limit_whole_and_fragmented(db) {
        let s = server_with(&db, |c| {
            c.max_frame_bytes = 2048;
            c.max_body_bytes = 1024;
        })
        .await;
        let (mut c, _) = s.connect_synced("alice").await;
        // Exactly max_frame_bytes: accepted and answered.
        c.send_raw(Message::Text(padded_ping("exact", 2048).into())).await;
        assert_eq!(c.recv_main().await, json!({"type": "pong", "ref": "exact"}));
        let head = r#"{"type":"send","ref":"big","to":{"user":"bob"},"body":""#;
        let body = "x".repeat(2048 - head.len() - 2);
        let text = format!("{head}{body}\"}}");
        assert_eq!(text.len(), 2048);
        expect_error(&mut c, &text, "too_large", Some("big")).await;
        // One byte more closes with 1009, and the session is gone.
        c.send_raw(Message::Text(padded_ping("over", 2049).into())).await;
        assert_eq!(closed(&mut c).await, Ended::Closed(1009));
        sessions_become(&s, 0).await;

        // The same with continuation frames.
        let (mut c, _) = s.connect_synced("alice").await;
        send_fragmented(&mut c, &padded_ping("frag", 2048), 700).await;
        assert_eq!(c.recv_main().await, json!({"type": "pong", "ref": "frag"}));
        send_fragmented(&mut c, &padded_ping("frag2", 900), 300).await;
        assert_eq!(c.recv_main().await, json!({"type": "pong", "ref": "frag2"}));
        send_fragmented(&mut c, &padded_ping("fragover", 2049), 700).await;
        assert_eq!(closed(&mut c).await, Ended::Closed(1009));
        sessions_become(&s, 0).await;
    }

    async fn broken_fragmentation_closes_with_1002_or_1007(db) {
        let s = TestServer::start(db.config()).await;
        let (mut c, _) = s.connect_synced("alice").await;
        c.send_raw(Message::Frame(Frame::message(b"{}".to_vec(), OpCode::Data(Data::Continue), true))).await;
        assert_eq!(closed(&mut c).await, Ended::Closed(1002));
        let (mut c, _) = s.connect_synced("alice").await;
        c.send_raw(Message::Frame(Frame::message(b"{\"type\":\"ping\",\"x\":\"".to_vec(), OpCode::Data(Data::Text), false))).await;
        c.send_raw(Message::Frame(Frame::message(vec![0xc3u8], OpCode::Data(Data::Continue), false))).await;
        c.send_raw(Message::Frame(Frame::message(b"\"}".to_vec(), OpCode::Data(Data::Continue), true))).await;
        assert_eq!(closed(&mut c).await, Ended::Closed(1007));
        sessions_become(&s, 0).await;
    }

    async fn binary_frames_close_with_1003(db) {
        let s = TestServer::start(db.config()).await;
        let (mut c, _) = s.connect_synced("alice").await;
        c.send_raw(Message::Binary(vec![1u8, 2, 3].into())).await;
        assert_eq!(closed(&mut c).await, Ended::Closed(1003));
        sessions_become(&s, 0).await;
        let (mut c, _) = s.connect_synced("alice").await;
        c.send_raw(Message::Frame(Frame::message(vec![1u8, 2], OpCode::Data(Data::Binary), false))).await;
        c.send_raw(Message::Frame(Frame::message(vec![3u8], OpCode::Data(Data::Continue), true))).await;
        assert_eq!(closed(&mut c).await, Ended::Closed(1003));
        sessions_become(&s, 0).await;
    }

    async fn too_many_bad_frames_in_a_row_close_with_1008(db) {
        let s = server_with(&db, |c| c.max_bad_frames = 3).await;
        let (mut owner, _) = s.connect_synced("bob").await;
        create_group(&mut owner, "team", &[]).await;
        let (mut c, _) = s.connect_synced("alice").await;
        let bad = [
            ("nope".to_string(), "bad_request"),
            (r#"{"type":"fly"}"#.to_string(), "unknown_type"),
            (json!({"type": "send", "to": {"user": "bob"}, "body": "x".repeat(5000)}).to_string(), "too_large"),
        ];
        async fn send_bad(c: &mut Client, bad: &[(String, &str)]) {
            for (text, code) in bad {
                c.send_raw(Message::Text(text.clone().into())).await;
                let e = c.recv_main().await;
                assert_eq!((e["type"].as_str(), e["code"].as_str()), (Some("error"), Some(*code)), "{e}");
            }
        }
        send_bad(&mut c, &bad).await;
        // A good frame resets the count.
        assert_open(&mut c).await;
        send_bad(&mut c, &bad).await;
        // So does a frame refused for another reason than being malformed.
        expect_code(&mut c, json!({"type": "send", "to": {"group": "team"}, "body": "x"}), "forbidden").await;
        send_bad(&mut c, &bad).await;
        // The fourth in a row is one too many.
        send_bad(&mut c, &bad[..1]).await;
        assert_eq!(closed(&mut c).await, Ended::Closed(1008));
        sessions_become(&s, 1).await;
    }

    async fn refused_acks_count_as_bad_frames(db) {
        let s = server_with(&db, |c| c.max_bad_frames = 3).await;
        let (mut a, _) = s.connect_synced("alice").await;
        sent_seq(&mut a, json!({"user": "bob"}), "hi").await;
        let bad_ack = json!({"type": "ack", "conv": "dm:alice:bob", "seq": 99});
        // Each refused ack is answered before the next is sent: four bad frames in a row.
        for _ in 0..3 {
            expect_code(&mut a, bad_ack.clone(), "bad_request").await;
        }
        a.send(bad_ack.clone()).await;
        let e = a.recv_main().await;
        assert_eq!(e["code"], "bad_request", "{e}");
        assert_eq!(closed(&mut a).await, Ended::Closed(1008));
        sessions_become(&s, 0).await;
    }

    async fn a_refused_ack_does_not_cancel_a_valid_one_before_it(db) {
        let s = TestServer::start(db.config()).await;
        let (mut a, _) = s.connect_synced("alice").await;
        // Several rounds, each in a conversation of its own: the acks below
        // race with the writing of earlier ones.
        const ROUNDS: usize = 8;
        for r in 0..ROUNDS {
            for i in 1..=5 {
                sent_seq(&mut a, json!({"user": format!("bob{r}")}), &format!("m{i}")).await;
            }
        }
        for r in 0..ROUNDS {
            let user = format!("bob{r}");
            let conv = format!("dm:alice:{user}");
            let (mut b, backlog) = s.connect_synced(&user).await;
            assert_eq!(conv_seqs(&backlog, &conv), vec![1, 2, 3, 4, 5]);
            // Three acks at once: two valid, then one beyond the last seq.
            for seq in [1, 3, 99] {
                b.send(json!({"type": "ack", "ref": format!("k{seq}"), "conv": conv, "seq": seq})).await;
            }
            let e = answer(&mut b, "k99").await;
            assert_eq!(e["code"], "bad_request", "{e}");
            assert!(of_type(&settle(&mut b).await, "error").is_empty(), "only the ack to 99 is refused");
            b.close().await;
            sessions_become(&s, 1).await;
            // The valid ack to 3 stands (acks are written in the background: wait for it).
            let mut last = Vec::new();
            for _ in 0..50 {
                let (b, backlog) = s.connect_synced(&user).await;
                last = conv_seqs(&backlog, &conv);
                b.close().await;
                sessions_become(&s, 1).await;
                if last == vec![4, 5] {
                    break;
                }
            }
            assert_eq!(last, vec![4, 5], "round {r}: the ack to 3 was lost");
        }
    }

    async fn the_send_rate_is_per_user_and_refusals_store_nothing(db) {
        let s = server_with(&db, |c| {
            c.rate_per_sec = 0.01;
            c.rate_burst = 3;
        })
        .await;
        let (mut owner, _) = s.connect_synced("carol").await;
        create_group(&mut owner, "closed", &[]).await;
        let (mut a1, _) = s.connect_synced("alice").await;
        let (mut a2, _) = s.connect_synced("alice").await;
        let (mut b, _) = s.connect_synced("bob").await;
        // Refused sends use no rate.
        for _ in 0..3 {
            expect_code(&mut a1, json!({"type": "send", "to": {"group": "closed"}, "body": "x"}), "forbidden").await;
            expect_code(&mut a2, json!({"type": "send", "to": {"group": "nosuch"}, "body": "x"}), "not_found").await;
            expect_code(&mut a1, json!({"type": "send", "to": {"user": "bob"}, "body": ""}), "bad_request").await;
        }
        // Three tokens for all of alice's sessions together; an idempotent resend takes one.
        let v = send_to(&mut a1, json!({"user": "bob"}), "one", Some("r-1")).await;
        assert_eq!((v["type"].as_str(), v["seq"].as_i64()), (Some("sent"), Some(1)));
        let v = send_to(&mut a2, json!({"user": "bob"}), "one", Some("r-1")).await;
        assert_eq!((v["type"].as_str(), v["seq"].as_i64()), (Some("sent"), Some(1)));
        let v = send_to(&mut a2, json!({"user": "bob"}), "two", Some("r-2")).await;
        assert_eq!((v["type"].as_str(), v["seq"].as_i64()), (Some("sent"), Some(2)));
        let v = send_to(&mut a1, json!({"user": "bob"}), "three", Some("r-3")).await;
        assert_eq!((v["type"].as_str(), v["code"].as_str()), (Some("error"), Some("rate_limited")), "{v}");
        let v = send_to(&mut a2, json!({"user": "carol"}), "four", Some("r-4")).await;
        assert_eq!(v["code"], "rate_limited", "{v}");
        // Nothing refused was stored or delivered.
        assert_eq!(seqs(&of_type(&settle(&mut b).await, "message")), vec![1, 2]);
        assert!(of_type(&settle(&mut owner).await, "message").is_empty());
        assert_eq!(history_seqs(&history(&mut b, "dm:alice:bob", None, None).await), vec![2, 1]);
        assert_eq!(history_seqs(&history(&mut owner, "dm:alice:carol", None, None).await), Vec::<i64>::new());
        // Other users have their own rate; the limited connection stays open.
        assert_eq!(sent_seq(&mut b, json!({"user": "alice"}), "from bob").await, 3);
        assert_open(&mut a1).await;
        assert!(stats(&s).await.rate_limited >= 2);
    }

    async fn heartbeat_drops_the_silent_and_keeps_the_answering(db) {
        let s = server_with(&db, |c| c.heartbeat_timeout = Duration::from_secs(3)).await;
        // A client that upgrades and then never reads nor writes (so never pongs).
        let mut silent = raw_ws_upgrade(s.addr, &format!("/ws?token={}", s.token("mute"))).await;
        let (mut good, _) = s.connect_synced("alice").await;
        sessions_become(&s, 2).await;
        // The answering client (tungstenite pongs as it reads) sees pings for twice the timeout.
        let mut pings = 0;
        while pings < 6 {
            let m = tokio::time::timeout(WAIT, good.ws.next()).await.expect("a frame in time").expect("open").expect("ok");
            match m {
                Message::Ping(_) => pings += 1,
                Message::Close(c) => panic!("the answering client was closed: {c:?}"),
                _ => {}
            }
        }
        assert_open(&mut good).await;
        // The silent one was dropped.
        sessions_become(&s, 1).await;
        use tokio::io::AsyncReadExt;
        let mut raw = Vec::new();
        tokio::time::timeout(WAIT, silent.read_to_end(&mut raw)).await.expect("the silent connection ends").ok();
        // It had been pinged (server frames are unmasked: opcode byte, length byte, payload).
        let mut i = 0;
        let mut server_pings = 0;
        while i + 2 <= raw.len() {
            let op = raw[i] & 0x0f;
            let (len, head) = match raw[i + 1] & 0x7f {
                126 if i + 4 <= raw.len() => (u16::from_be_bytes([raw[i + 2], raw[i + 3]]) as usize, 4),
                127 => break,
                n => (n as usize, 2),
            };
            if op == 0x9 {
                server_pings += 1;
            }
            i += head + len;
        }
        assert!(server_pings >= 1, "no ping before the disconnect: {raw:?}");
        sessions_become(&s, 1).await;
    }

    async fn every_way_a_session_ends_removes_it(db) {
        let s = TestServer::start(db.config()).await;
        let (mut a1, _) = s.connect_synced("alice").await;
        let (a2, _) = s.connect_synced("alice").await;
        let (b, _) = s.connect_synced("bob").await;
        sessions_become(&s, 3).await;
        a2.close().await;
        sessions_become(&s, 2).await;
        drop(b);
        sessions_become(&s, 1).await;
        let (mut a3, _) = s.connect_synced("alice").await;
        let (mut c, _) = s.connect_synced("carol").await;
        sessions_become(&s, 3).await;
        // The server API closes every session of a user with 4001.
        let path = "/api/users/alice/disconnect";
        assert_eq!(http_request(s.addr, "POST", path, &[], "").await.0, 401);
        assert_eq!(http_request(s.addr, "POST", path, &[("Authorization", "Bearer wrong-key-0123456789")], "").await.0, 401);
        let (status, body) = http_request(s.addr, "POST", path, &[("Authorization", "Bearer test-api-key-0123456789")], "").await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(serde_json::from_str::<Value>(&body).expect("json")["closed"], 2);
        assert_eq!(closed(&mut a1).await, Ended::Closed(4001));
        assert_eq!(closed(&mut a3).await, Ended::Closed(4001));
        sessions_become(&s, 1).await;
        assert_open(&mut c).await;
        let st = stats(&s).await;
        assert_eq!((st.sessions, st.users_online), (1, 1));
    }

    async fn graceful_stop_stores_what_was_received_and_closes_with_1001(db) {
        let mut s = TestServer::start(db.config()).await;
        let (mut a, _) = s.connect_synced("alice").await;
        let (mut b, _) = s.connect_synced("bob").await;
        for i in 0..50 {
            a.send(json!({"type": "send", "to": {"user": "bob"}, "body": format!("m{i}"), "client_id": format!("c{i}")})).await;
        }
        // The pong means the session has handed every send above to the hub.
        let mut sent = sent_until_pong(&mut a).await;
        let hub = s.server();
        s.stop().await;
        let code = a.sent_until_close(&mut sent).await;
        assert_eq!(code, Some(1001));
        assert_eq!(sent, (1..=50).collect::<Vec<_>>(), "every send received before the stop is answered `sent`");
        assert_eq!(closed(&mut b).await, Ended::Closed(1001));
        assert_eq!(hub.send(chat_hub::hub::server::GetStats).await.unwrap().sessions, 0);
        let s = TestServer::start(db.config()).await;
        let (_b, backlog) = s.connect_synced("bob").await;
        assert_eq!(conv_seqs(&backlog, "dm:alice:bob"), (1..=50).collect::<Vec<_>>());
        assert_eq!(backlog[49]["body"], "m49");
    }

    async fn messages_sent_before_a_restart_are_delivered_after_it(db) {
        let mut s = TestServer::start(db.config()).await;
        let (mut a, _) = s.connect_synced("alice").await;
        create_group(&mut a, "team", &["bob"]).await;
        let mut expect: BTreeMap<String, Vec<i64>> = BTreeMap::new();
        for i in 0..20 {
            let to = if i % 2 == 0 { json!({"user": "bob"}) } else { json!({"group": "team"}) };
            let v = send_to(&mut a, to, &format!("m{i}"), None).await;
            assert_eq!(v["type"], "sent", "{v}");
            expect.entry(v["conv"].as_str().unwrap().to_string()).or_default().push(v["seq"].as_i64().unwrap());
        }
        s.stop().await;
        assert_eq!(closed(&mut a).await, Ended::Closed(1001));
        let s = TestServer::start(db.config()).await;
        let (_b, backlog) = s.connect_synced("bob").await;
        let mut got: BTreeMap<String, Vec<i64>> = BTreeMap::new();
        for m in &backlog {
            got.entry(m["conv"].as_str().unwrap().to_string()).or_default().push(m["seq"].as_i64().unwrap());
        }
        assert_eq!(got, expect);
        // The group survived the restart, and its seqs continue without reuse.
        let (mut a, _) = s.connect_synced("alice").await;
        let l = request(&mut a, json!({"type": "groups"})).await;
        assert_eq!(l["groups"][0]["members"], json!(["alice", "bob"]));
        assert_eq!(sent_seq(&mut a, json!({"group": "team"}), "after").await, 11);
        assert_eq!(sent_seq(&mut a, json!({"user": "bob"}), "after").await, 11);
    }

    async fn churn_loses_nothing_and_keeps_order(db) {
        let s = server_with(&db, |c| {
            c.rate_per_sec = 1e6;
            c.rate_burst = 1_000_000;
        })
        .await;
        const N: usize = 200;
        const SENDERS: usize = 3;
        // conv -> seqs whose sender got `sent`; senders that are done.
        type Sent = (HashMap<String, BTreeSet<i64>>, usize);
        let sent: Rc<RefCell<Sent>> = Rc::default();
        let done = Rc::new(tokio::sync::Notify::new());
        let sender = |i: usize| {
            let (sent, done, s) = (sent.clone(), done.clone(), &s);
            async move {
                let (mut c, _) = s.connect_synced(&format!("sender{i}")).await;
                for chunk in 0..N / 10 {
                    for j in 0..10 {
                        let k = chunk * 10 + j;
                        c.send(json!({"type": "send", "to": {"user": "rcpt"}, "body": format!("{i}/{k}"), "client_id": format!("{i}-{k}")})).await;
                    }
                    for _ in 0..10 {
                        let v = c.recv_main().await;
                        match v["type"].as_str() {
                            Some("sent") => {
                                let new = sent.borrow_mut().0.entry(v["conv"].as_str().unwrap().to_string()).or_default().insert(v["seq"].as_i64().unwrap());
                                assert!(new, "one seq answered twice: {v}");
                            }
                            _ => assert_eq!(v["code"], "unavailable", "{v}"),
                        }
                    }
                }
                sent.borrow_mut().1 += 1;
                done.notify_one();
            }
        };
        let receiver = async {
            let mut have: HashMap<String, BTreeSet<i64>> = HashMap::new();
            let mut connections = 0;
            let complete = |have: &HashMap<String, BTreeSet<i64>>| {
                let st = sent.borrow();
                st.1 == SENDERS && st.0.iter().all(|(conv, seqs)| have.get(conv).is_some_and(|h| h.is_superset(seqs)))
            };
            'conn: loop {
                connections += 1;
                let mut c = s.connect("rcpt").await;
                // Acks get no reply, and the last ones of a connection may be applied after
                // the next connection loaded its backlog: each connection acks afresh.
                let mut acked: HashMap<String, i64> = HashMap::new();
                let mut in_conn: HashMap<String, BTreeSet<i64>> = HashMap::new();
                let mut received = 0;
                loop {
                    if complete(&have) {
                        break 'conn;
                    }
                    let m = tokio::select! {
                        m = tokio::time::timeout(WAIT, c.ws.next()) => m.expect("a frame in time").expect("open").expect("ok"),
                        _ = done.notified() => continue,
                    };
                    let Message::Text(t) = m else { continue };
                    let v: Value = serde_json::from_str(&t).unwrap();
                    match v["type"].as_str() {
                        Some("message") => {}
                        Some("error") => panic!("{v}"),
                        _ => continue,
                    }
                    let conv = v["conv"].as_str().unwrap().to_string();
                    let seq = v["seq"].as_i64().unwrap();
                    let mine = in_conn.entry(conv.clone()).or_default();
                    if mine.last().is_some_and(|last| seq <= *last) {
                        assert!(mine.contains(&seq), "connection {connections}: {conv} seq {seq} after {:?}", mine.last());
                    }
                    mine.insert(seq);
                    // Only new messages count towards the next disconnect: acks sent
                    // just before an abrupt close may be lost with it, and their
                    // messages then come again.
                    if !have.entry(conv.clone()).or_default().insert(seq) {
                        continue;
                    }
                    received += 1;
                    if received % 10 == 0 {
                        for (conv, h) in &have {
                            let upto = (1..).take_while(|n| h.contains(n)).last().unwrap_or(0);
                            if upto > *acked.get(conv).unwrap_or(&0) {
                                c.send(json!({"type": "ack", "conv": conv, "seq": upto})).await;
                                acked.insert(conv.clone(), upto);
                            }
                        }
                    }
                    if received >= 50 {
                        if connections % 2 == 0 {
                            c.close().await;
                        } else {
                            drop(c);
                        }
                        continue 'conn;
                    }
                }
            }
            connections
        };
        let (connections, ..) = futures_util::future::join4(receiver, sender(0), sender(1), sender(2)).await;
        let st = sent.borrow();
        let total: usize = st.0.values().map(BTreeSet::len).sum();
        assert!(total > 0);
        for (conv, seqs) in &st.0 {
            assert_eq!(seqs.iter().copied().collect::<Vec<_>>(), (1..=seqs.len() as i64).collect::<Vec<_>>(), "{conv}: seqs without gap");
        }
        assert!(connections >= 5, "the receiver reconnected {connections} times only");
    }

    async fn a_slow_consumer_is_dropped_and_gets_the_backlog_on_reconnect(db) {
        let s = server_with(&db, |c| {
            c.session_queue = 16;
            c.rate_per_sec = 1e6;
            c.rate_burst = 1_000_000;
        })
        .await;
        let (mut victim, _) = s.connect_synced("victim").await;
        let (mut flooder, _) = s.connect_synced("flooder").await;
        let body = "x".repeat(4000);
        let mut sent = 0i64;
        // The victim stops reading; the flooder sends until the server gives up on it
        // (a few at a time: its own answers must not overflow its own queue).
        for _ in 0..1000 {
            for _ in 0..8 {
                flooder.send(json!({"type": "send", "to": {"user": "victim"}, "body": body})).await;
            }
            for _ in 0..8 {
                let v = flooder.recv_main().await;
                assert_eq!(v["type"], "sent", "{v}");
                sent = sent.max(v["seq"].as_i64().unwrap());
            }
            if stats(&s).await.evictions > 0 {
                break;
            }
        }
        let st = stats(&s).await;
        assert!(st.evictions > 0, "never evicted after {sent} messages");
        sessions_become(&s, 1).await;
        assert_eq!(stats(&s).await.users_online, 1);
        // More messages are not queued for it any more.
        assert_eq!(sent_seq(&mut flooder, json!({"user": "victim"}), "after").await, sent + 1);
        sent += 1;
        // Reading again, the victim finds its connection ended after what was
        // queued before the eviction (never the message sent after it).
        let mut live_max = 0;
        loop {
            match tokio::time::timeout(WAIT, victim.ws.next()).await.expect("the connection ends in time") {
                Some(Ok(Message::Text(t))) => {
                    let v: Value = serde_json::from_str(&t).unwrap();
                    live_max = live_max.max(v["seq"].as_i64().unwrap_or(0));
                }
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break,
                Some(Ok(_)) => {}
            }
        }
        assert!(live_max < sent, "the evicted session still got seq {live_max}");
        // It reconnects and gets everything it did not acknowledge.
        let (_v, backlog) = s.connect_synced("victim").await;
        assert_eq!(conv_seqs(&backlog, "dm:flooder:victim"), (1..=sent).collect::<Vec<_>>());
    }
}
