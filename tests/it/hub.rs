//! The ChatServer and DbExecutor driven directly, with probe actors standing
//! in for sessions (no sockets): routing, fan-out, groups, presence, backlog,
//! acks, rate limits, eviction and shutdown.

use actix::prelude::*;
use chat_hub::db::executor::{self as dbx, GroupOp};
use chat_hub::db::models::Stored;
use chat_hub::error::{ChatError, ErrorCode};
use chat_hub::hub::server::*;
use chat_hub::hub::session::next_session_id;
use chat_hub::ids::{ConvKey, GroupId, Target, UserId};
use serde_json::Value;
use tokio::sync::oneshot;

use crate::common::*;

fn u(s: &str) -> UserId {
    UserId::parse(s).unwrap()
}
fn g(s: &str) -> GroupId {
    GroupId::parse(s).unwrap()
}

struct Hub {
    server: Addr<ChatServer>,
    db: Addr<chat_hub::db::DbExecutor>,
    _pool: chat_hub::db::Pool,
}

fn hub_with(db: &TestDb, tweak: impl FnOnce(&mut HubConfig)) -> Hub {
    let (x, pool) = db.executor(2);
    let mut cfg = HubConfig::from_config(&db.config());
    tweak(&mut cfg);
    let server = ChatServer::new(x.clone(), cfg, vec![]).start();
    Hub {
        server,
        db: x,
        _pool: pool,
    }
}

impl Hub {
    /// Register a probe as a session of `user`; waits until registered.
    async fn join(&self, user: &str) -> (SessionId, ProbeRx) {
        let (rec, rx) = probe();
        let id = next_session_id();
        assert!(self
            .server
            .send(Connect {
                id,
                user: u(user),
                session: rec
            })
            .await
            .unwrap());
        (id, rx)
    }

    async fn send_from(&self, id: SessionId, user: &str, to: Target, body: &str, r: &str) {
        let reply = Reply::Session {
            id,
            r#ref: Some(r.into()),
        };
        self.server
            .send(ClientSend {
                sender: u(user),
                to,
                body: body.into(),
                client_id: None,
                reply,
            })
            .await
            .unwrap();
    }

    async fn api_send(&self, from: &str, to: Target, body: &str) -> Result<Stored, ChatError> {
        let (tx, rx) = oneshot::channel();
        self.server.do_send(ClientSend {
            sender: u(from),
            to,
            body: body.into(),
            client_id: None,
            reply: Reply::Api(tx),
        });
        rx.await.unwrap()
    }

    async fn group(
        &self,
        by: Option<&str>,
        op: GroupOp,
    ) -> Result<chat_hub::protocol::GroupView, ChatError> {
        let (tx, rx) = oneshot::channel();
        self.server.do_send(ChangeGroup {
            by: by.map(u),
            op,
            reply: Reply::Api(tx),
        });
        rx.await.unwrap()
    }

    async fn stats(&self) -> Stats {
        self.server.send(GetStats).await.unwrap()
    }
}

fn create(group: &str, owner: &str, members: &[&str]) -> GroupOp {
    GroupOp::Create {
        group: g(group),
        name: group.into(),
        owner: u(owner),
        members: members.iter().map(|m| u(m)).collect(),
    }
}

backend_tests! {
    async fn direct_messages_reach_every_session_but_the_sending_one(db) {
        let hub = hub_with(&db, |_| {});
        let (a1, mut a1rx) = hub.join("alice").await;
        let (_a2, mut a2rx) = hub.join("alice").await;
        let (_b1, mut b1rx) = hub.join("bob").await;
        let (_b2, mut b2rx) = hub.join("bob").await;
        let (_c, mut crx) = hub.join("carol").await;
        hub.send_from(a1, "alice", Target::User(u("bob")), "hi", "r1").await;
        let sent = a1rx.json_skip_presence().await;
        assert_eq!((sent["type"].as_str(), sent["ref"].as_str(), sent["conv"].as_str(), sent["seq"].as_i64()), (Some("sent"), Some("r1"), Some("dm:alice:bob"), Some(1)));
        for rx in [&mut a2rx, &mut b1rx, &mut b2rx] {
            let m = rx.json_skip_presence().await;
            assert_eq!((m["type"].as_str(), m["from"].as_str(), m["body"].as_str(), m["seq"].as_i64()), (Some("message"), Some("alice"), Some("hi"), Some(1)));
            assert_eq!(m["to"]["user"], "bob");
        }
        // Nothing more for the sending session, nothing at all for carol.
        hub.send_from(a1, "alice", Target::User(u("alice")), "self", "r2").await;
        let s2 = a1rx.json_skip_presence().await;
        assert_eq!((s2["type"].as_str(), s2["conv"].as_str()), (Some("sent"), Some("dm:alice:alice")));
        assert_eq!(a2rx.json_skip_presence().await["conv"], "dm:alice:alice");
        assert!(crx.try_json().is_none());
    }

    async fn group_messages_fan_out_to_members_only(db) {
        let hub = hub_with(&db, |_| {});
        let (a, mut arx) = hub.join("alice").await;
        let (_b, mut brx) = hub.join("bob").await;
        let (_c, mut crx) = hub.join("carol").await;
        let (m, mut mrx) = hub.join("mallory").await;
        hub.group(Some("alice"), create("team", "alice", &["bob", "carol"])).await.unwrap();
        for rx in [&mut arx, &mut brx, &mut crx] {
            let ev = rx.json_skip_presence().await;
            assert_eq!((ev["type"].as_str(), ev["event"].as_str()), (Some("group"), Some("created")));
        }
        hub.send_from(a, "alice", Target::Group(g("team")), "all", "r").await;
        assert_eq!(arx.json_skip_presence().await["type"], "sent");
        for rx in [&mut brx, &mut crx] {
            let ev = rx.json_skip_presence().await;
            assert_eq!((ev["type"].as_str(), ev["conv"].as_str(), ev["to"]["group"].as_str()), (Some("message"), Some("group:team"), Some("team")));
        }
        hub.send_from(m, "mallory", Target::Group(g("team")), "let me in", "x").await;
        let e = mrx.json_skip_presence().await;
        assert_eq!((e["type"].as_str(), e["code"].as_str(), e["ref"].as_str()), (Some("error"), Some("forbidden"), Some("x")));
        hub.send_from(m, "mallory", Target::Group(g("ghost")), "?", "y").await;
        assert_eq!(mrx.json_skip_presence().await["code"], "not_found");
        assert!(mrx.try_json().is_none());
    }

    async fn group_changes_keep_the_cache_and_events_right(db) {
        let hub = hub_with(&db, |_| {});
        let (_a, mut arx) = hub.join("alice").await;
        let (_b, mut brx) = hub.join("bob").await;
        hub.group(None, create("team", "alice", &["bob"])).await.unwrap();
        let created = arx.json_skip_presence().await;
        assert_eq!(created["by"], Value::Null, "a change through the API has no user");
        brx.json_skip_presence().await;
        hub.group(None, GroupOp::Remove { group: g("team"), user: u("bob") }).await.unwrap();
        for rx in [&mut arx, &mut brx] {
            let ev = rx.json_skip_presence().await;
            assert_eq!((ev["event"].as_str(), ev["user"].as_str()), (Some("removed"), Some("bob")), "the removed user hears it too");
        }
        // bob is out of the cache: his group send is refused, typing too.
        let (b2, mut b2rx) = hub.join("bob").await;
        hub.send_from(b2, "bob", Target::Group(g("team")), "hey", "r").await;
        assert_eq!(b2rx.json_skip_presence().await["code"], "forbidden");
        // A message while bob is out does not reach him live.
        hub.api_send("alice", Target::Group(g("team")), "private").await.unwrap();
        assert_eq!(arx.json_skip_presence().await["body"], "private");
        assert!(brx.try_json().is_none());
        let err = hub.group(None, GroupOp::Add { group: g("team"), user: u("alice") }).await.unwrap_err();
        assert_eq!(err.code, ErrorCode::Conflict);
    }

    async fn presence_follows_first_and_last_session(db) {
        let hub = hub_with(&db, |_| {});
        hub.api_send("alice", Target::User(u("bob")), "hello").await.unwrap();
        let (_a, mut arx) = hub.join("alice").await;
        let (b1, mut b1rx) = hub.join("bob").await;
        let p = arx.json().await;
        assert_eq!((p["type"].as_str(), p["user"].as_str(), p["online"].as_bool()), (Some("presence"), Some("bob"), Some(true)));
        // bob hears that alice is already online.
        let p = b1rx.json().await;
        assert_eq!((p["user"].as_str(), p["online"].as_bool()), (Some("alice"), Some(true)));
        let (b2, _b2rx) = hub.join("bob").await;
        hub.server.send(Disconnect { id: b1 }).await.unwrap();
        assert!(arx.try_json().is_none(), "bob still has a session");
        hub.server.send(Disconnect { id: b2 }).await.unwrap();
        let p = arx.json().await;
        assert_eq!((p["user"].as_str(), p["online"].as_bool()), (Some("bob"), Some(false)));
        // A stranger hears nothing.
        let (_c, mut crx) = hub.join("carol").await;
        let (_b3, _) = hub.join("bob").await;
        assert_eq!(arx.json().await["online"], true);
        assert!(crx.try_json().is_none());
    }

    async fn sessions_leave_every_map(db) {
        let hub = hub_with(&db, |_| {});
        let (a, _arx) = hub.join("alice").await;
        let (_b1, mut b1rx) = hub.join("bob").await;
        let (_b2, mut b2rx) = hub.join("bob").await;
        assert_eq!(hub.stats().await.sessions, 3);
        hub.server.send(Disconnect { id: a }).await.unwrap();
        assert!(!hub.server.send(HasSession(a)).await.unwrap());
        let n = hub.server.send(DisconnectUser { user: u("bob"), reason: "ban".into() }).await.unwrap();
        assert_eq!(n, 2);
        for rx in [&mut b1rx, &mut b2rx] {
            assert_eq!(rx.json_skip_presence().await["close"], close::DISCONNECTED_BY_API);
        }
        let s = hub.stats().await;
        assert_eq!((s.sessions, s.users_online), (0, 0));
    }

    async fn the_oldest_session_goes_past_the_per_user_limit(db) {
        let hub = hub_with(&db, |c| c.max_sessions_per_user = 2);
        let (s1, mut rx1) = hub.join("alice").await;
        let (_s2, _) = hub.join("alice").await;
        let (_s3, _) = hub.join("alice").await;
        assert_eq!(rx1.json().await["close"], close::SESSION_LIMIT);
        assert!(!hub.server.send(HasSession(s1)).await.unwrap());
        assert_eq!(hub.stats().await.sessions, 2);
    }

    async fn the_send_rate_is_per_user_and_refusals_are_free(db) {
        let hub = hub_with(&db, |c| {
            c.rate_per_sec = 0.001;
            c.rate_burst = 3;
        });
        let (a1, mut a1rx) = hub.join("alice").await;
        let (a2, mut a2rx) = hub.join("alice").await;
        // A refused send (no such group) uses no token.
        hub.send_from(a1, "alice", Target::Group(g("ghost")), "x", "nf").await;
        assert_eq!(a1rx.json_skip_presence().await["code"], "not_found");
        for i in 0..3 {
            let (id, rx) = if i % 2 == 0 { (a1, &mut a1rx) } else { (a2, &mut a2rx) };
            hub.send_from(id, "alice", Target::User(u("bob")), "x", "ok").await;
            loop {
                let v = rx.json_skip_presence().await;
                if v["type"] == "sent" {
                    break;
                }
            }
        }
        hub.send_from(a2, "alice", Target::User(u("bob")), "x", "over").await;
        let v = loop {
            let v = a2rx.json_skip_presence().await;
            if v["type"] != "message" {
                break v;
            }
        };
        assert_eq!((v["code"].as_str(), v["ref"].as_str()), (Some("rate_limited"), Some("over")));
        assert_eq!(hub.stats().await.rate_limited, 1);
        // Nothing of the refused send was stored: bob's backlog has exactly three.
        let page = hub.db.send(dbx::LoadBacklog { user: u("bob"), after: None, limit: 100 }).await.unwrap().unwrap();
        assert_eq!(page.items.len(), 3);
    }

    async fn a_session_that_stops_reading_is_evicted(db) {
        let hub = hub_with(&db, |c| {
            c.rate_per_sec = 1e6;
            c.rate_burst = 1_000_000;
        });
        let (rec, mut slow_rx, release) = stalled_probe(16);
        let slow = next_session_id();
        assert!(hub.server.send(Connect { id: slow, user: u("bob"), session: rec }).await.unwrap());
        let (_fast, mut fast_rx) = hub.join("bob").await;
        let (a, _arx) = hub.join("alice").await;
        for i in 0..40 {
            hub.send_from(a, "alice", Target::User(u("bob")), &format!("m{i}"), "r").await;
        }
        // The healthy session of the same user gets all 40.
        let mut got = 0;
        while got < 40 {
            if fast_rx.json_skip_presence().await["type"] == "message" {
                got += 1;
            }
        }
        assert!(!hub.server.send(HasSession(slow)).await.unwrap(), "the stalled session was dropped");
        assert!(hub.stats().await.evictions >= 1);
        // Once it reads again it learns why it was closed; what it missed is in the backlog.
        let _ = release.send(());
        let closed = loop {
            let v = slow_rx.json().await;
            if v.get("close").is_some() {
                break v;
            }
        };
        assert_eq!(closed["close"], close::TRY_AGAIN_LATER);
        let page = hub.db.send(dbx::LoadBacklog { user: u("bob"), after: None, limit: 100 }).await.unwrap().unwrap();
        assert_eq!(page.items.len(), 40);
    }

    async fn concurrent_senders_are_delivered_in_seq_order(db) {
        let hub = hub_with(&db, |c| {
            c.rate_per_sec = 1e6;
            c.rate_burst = 1_000_000;
        });
        hub.group(None, create("room", "s0", &["s1", "s2", "s3", "reader"])).await.unwrap();
        let (_r, mut rrx) = hub.join("reader").await;
        let mut senders = Vec::new();
        for i in 0..4 {
            senders.push(hub.join(&format!("s{i}")).await.0);
        }
        for k in 0..50 {
            for (i, id) in senders.iter().enumerate() {
                let reply = Reply::Session { id: *id, r#ref: None };
                hub.server.do_send(ClientSend { sender: u(&format!("s{i}")), to: Target::Group(g("room")), body: format!("{k}"), client_id: None, reply });
            }
        }
        let mut last = 0;
        let mut n = 0;
        while n < 200 {
            let v = rrx.json_skip_presence().await;
            if v["type"] != "message" {
                continue;
            }
            let seq = v["seq"].as_i64().unwrap();
            assert_eq!(seq, last + 1, "in order, no gap");
            last = seq;
            n += 1;
        }
    }

    async fn shutdown_finishes_writes_then_closes_sessions(db) {
        let hub = hub_with(&db, |_| {});
        let (a, mut arx) = hub.join("alice").await;
        for i in 0..20 {
            hub.server.do_send(ClientSend { sender: u("alice"), to: Target::User(u("bob")), body: format!("{i}"), client_id: None, reply: Reply::Session { id: a, r#ref: None } });
        }
        hub.server.send(Shutdown).await.unwrap();
        let mut sent = 0;
        let code = loop {
            let v = arx.json_skip_presence().await;
            if v["type"] == "sent" {
                sent += 1;
            } else if let Some(c) = v.get("close") {
                break c.clone();
            }
        };
        assert_eq!((sent, code), (20, Value::from(close::GOING_AWAY)), "every received send answered before the close");
        assert_eq!(hub.stats().await.sessions, 0);
        let (rec, mut late) = probe();
        assert!(!hub.server.send(Connect { id: next_session_id(), user: u("carol"), session: rec }).await.unwrap());
        assert_eq!(late.json().await["close"], close::GOING_AWAY);
        let page = hub.db.send(dbx::LoadBacklog { user: u("bob"), after: None, limit: 100 }).await.unwrap().unwrap();
        assert_eq!(page.items.len(), 20);
    }
}

#[test]
fn conv_keys_for_targets() {
    let k = ConvKey::for_target(&u("zed"), &Target::User(u("amy")));
    assert_eq!(k.to_string(), "dm:amy:zed");
}
