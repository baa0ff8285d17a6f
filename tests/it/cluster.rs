//! Cluster mode: several chat-hub nodes in this process joined through a real
//! Redis, sharing one database. The MariaDB variants need the `mysql` feature,
//! `CHAT_HUB_TEST_MYSQL_URL` and `CHAT_HUB_TEST_REDIS_URL` (e.g.
//! redis://127.0.0.1:6379/); each test uses its own channel prefix, so tests
//! run in parallel on one Redis. The three-process tests with nginx, a node
//! killed and Redis restarted are in tests/cluster/.

use serde_json::{json, Value};

use crate::common::*;

async fn send(c: &mut Client, to: Value, body: &str, r: &str) -> Value {
    c.send(json!({"type": "send", "ref": r, "to": to, "body": body}))
        .await;
    loop {
        let v = c.recv().await;
        if v["ref"] == r {
            return v;
        }
    }
}

async fn next_message(c: &mut Client) -> Value {
    c.recv_type("message").await
}

// A node whose Redis cannot be reached is a working standalone node.
backend_tests! {
    async fn a_node_without_its_redis_serves_and_stores(db) {
        let mut c = db.config();
        // Nothing listens on port 1: the bus keeps retrying in the background.
        c.redis_url = Some("redis://127.0.0.1:1/".into());
        c.node_id = "lonely".into();
        let s = TestServer::start(c).await;
        let (mut alice, _) = s.connect_synced("alice").await;
        let (mut bob, _) = s.connect_synced("bob").await;
        let v = send(&mut alice, json!({"user": "bob"}), "still here", "r1").await;
        assert_eq!(v["type"], "sent", "{v}");
        let m = next_message(&mut bob).await;
        assert_eq!(m["body"], "still here");
        let st = stats(&s).await;
        assert!(!st.bus_up);
        assert_eq!(st.messages_stored, 1);
    }
}

#[cfg(feature = "mysql")]
mod mysql {
    use super::*;
    use chat_hub::config::Config;

    fn redis_url() -> String {
        std::env::var("CHAT_HUB_TEST_REDIS_URL")
            .expect("the cluster tests need CHAT_HUB_TEST_REDIS_URL, e.g. redis://127.0.0.1:6379/")
    }

    struct Cluster {
        nodes: Vec<TestServer>,
        prefix: String,
        _db: TestDb,
        db_config: Config,
    }

    /// `n` nodes on one fresh MariaDB database and a fresh prefix, joined:
    /// each connected to Redis and aware of all the others.
    async fn cluster(n: usize) -> Cluster {
        let db = TestDb::mysql();
        let prefix = format!("t{}", uuid::Uuid::now_v7().simple());
        let mut nodes = Vec::new();
        for i in 0..n {
            let mut c = db.config();
            c.redis_url = Some(redis_url());
            c.redis_prefix = prefix.clone();
            c.node_id = format!("node{i}");
            nodes.push(TestServer::start(c).await);
        }
        for s in &nodes {
            let addr = s.server();
            eventually("the nodes see each other", || {
                let addr = addr.clone();
                async move {
                    addr.send(chat_hub::hub::server::GetStats)
                        .await
                        .map(|st| st.bus_up && st.cluster_nodes == n - 1)
                        .unwrap_or(false)
                }
            })
            .await;
        }
        Cluster {
            nodes,
            prefix,
            db_config: db.config(),
            _db: db,
        }
    }

    /// Wait until `node` counts `n` users online on other nodes.
    async fn remote_users_become(node: &TestServer, n: usize) {
        let addr = node.server();
        eventually(&format!("{n} users online elsewhere"), || {
            let addr = addr.clone();
            async move {
                addr.send(chat_hub::hub::server::GetStats)
                    .await
                    .map(|st| st.remote_users == n)
                    .unwrap_or(false)
            }
        })
        .await;
    }

    #[actix_rt::test]
    async fn direct_messages_cross_nodes_to_every_device() {
        let c = cluster(2).await;
        let (a, b) = (&c.nodes[0], &c.nodes[1]);
        let (mut alice, _) = a.connect_synced("alice").await;
        let (mut alice_phone, _) = b.connect_synced("alice").await;
        let (mut bob, _) = b.connect_synced("bob").await;
        let v = send(&mut alice, json!({"user": "bob"}), "hello from A", "r1").await;
        assert_eq!(v["type"], "sent", "{v}");
        let m = next_message(&mut bob).await;
        assert_eq!(
            (m["body"].as_str(), m["from"].as_str()),
            (Some("hello from A"), Some("alice"))
        );
        assert_eq!(m["seq"], v["seq"]);
        let m = next_message(&mut alice_phone).await;
        assert_eq!(
            m["body"], "hello from A",
            "the sender's other device, on the other node"
        );
        let v = send(&mut bob, json!({"user": "alice"}), "hello from B", "r2").await;
        assert_eq!(v["seq"], 2, "{v}");
        let m = next_message(&mut alice).await;
        assert_eq!(
            (m["body"].as_str(), m["seq"].as_i64()),
            (Some("hello from B"), Some(2))
        );
    }

    #[actix_rt::test]
    async fn a_group_spanning_three_nodes_gets_every_message_in_order() {
        let c = cluster(3).await;
        let users = ["ann", "ben", "cat"];
        let (st, g) = api(
            &c.nodes[0],
            "POST",
            "/api/groups",
            json!({"group": "crew", "owner": "ann", "members": ["ben", "cat"]}),
        )
        .await;
        assert_eq!(st, 201, "{g}");
        let mut clients = Vec::new();
        for (i, u) in users.iter().enumerate() {
            clients.push(c.nodes[i].connect_synced(u).await.0);
        }
        let per_user = 5;
        let mut own: Vec<Vec<i64>> = vec![Vec::new(); users.len()];
        for round in 0..per_user {
            for (i, cl) in clients.iter_mut().enumerate() {
                cl.send(json!({"type": "send", "ref": format!("{i}-{round}"), "to": {"group": "crew"}, "body": format!("{} {round}", users[i])})).await;
            }
        }
        let total = per_user * users.len();
        for (i, cl) in clients.iter_mut().enumerate() {
            let mut got: Vec<i64> = Vec::new();
            // One deadline for all (presence frames would reset a per-frame one).
            let deadline = tokio::time::Instant::now() + WAIT;
            while own[i].len() + got.len() < total {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "{} still misses some: sent {:?}, got {got:?}",
                    users[i],
                    own[i]
                );
                let v = cl.recv().await;
                match v["type"].as_str() {
                    Some("sent") => own[i].push(v["seq"].as_i64().expect("seq")),
                    Some("message") => {
                        assert_ne!(v["from"], users[i], "no echo to the sending session");
                        got.push(v["seq"].as_i64().expect("seq"));
                    }
                    Some("error") => panic!("{v}"),
                    _ => {}
                }
            }
            assert!(
                got.windows(2).all(|w| w[0] < w[1]),
                "{} got {got:?} out of order",
                users[i]
            );
            let mut all: Vec<i64> = got.iter().chain(own[i].iter()).copied().collect();
            all.sort_unstable();
            assert_eq!(
                all,
                (1..=total as i64).collect::<Vec<_>>(),
                "{} misses some",
                users[i]
            );
        }
    }

    #[actix_rt::test]
    async fn presence_and_group_changes_are_cluster_wide() {
        let c = cluster(2).await;
        let (a, b) = (&c.nodes[0], &c.nodes[1]);
        api(
            a,
            "POST",
            "/api/groups",
            json!({"group": "pair", "owner": "alice", "members": ["bob"]}),
        )
        .await;
        let (mut alice, _) = a.connect_synced("alice").await;
        remote_users_become(b, 1).await;
        // bob's snapshot on B includes alice, online on A (it may come
        // before or after `synced`).
        let mut bob = b.connect("bob").await;
        let p = bob.recv_type("presence").await;
        assert_eq!(
            (p["user"].as_str(), p["online"].as_bool()),
            (Some("alice"), Some(true))
        );
        let p = alice.recv_type("presence").await;
        assert_eq!(
            (p["user"].as_str(), p["online"].as_bool()),
            (Some("bob"), Some(true))
        );
        // A change made through B reaches a member on A, and A's cache follows:
        // carol, added on B, may then send to the group through A.
        let (st, _) = api(b, "PUT", "/api/groups/pair/members/carol", Value::Null).await;
        assert_eq!(st, 204);
        let e = alice.recv_type("group").await;
        assert_eq!(
            (e["event"].as_str(), e["user"].as_str()),
            (Some("added"), Some("carol")),
            "{e}"
        );
        let (mut carol, _) = a.connect_synced("carol").await;
        let v = send(&mut carol, json!({"group": "pair"}), "hi both", "c1").await;
        assert_eq!(v["type"], "sent", "{v}");
        assert_eq!(next_message(&mut bob).await["body"], "hi both");
        // bob leaves: alice hears it, though bob was never on her node.
        bob.close().await;
        loop {
            let p = alice.recv_type("presence").await;
            if p["user"] == "bob" {
                assert_eq!(p["online"], false);
                break;
            }
        }
    }

    #[actix_rt::test]
    async fn disconnect_through_one_node_closes_sessions_on_every_node() {
        let c = cluster(2).await;
        let (a, b) = (&c.nodes[0], &c.nodes[1]);
        let (mut b1, _) = a.connect_synced("bob").await;
        let (mut b2, _) = b.connect_synced("bob").await;
        let (mut b3, _) = b.connect_synced("bob").await;
        remote_users_become(a, 1).await;
        let (st, v) = api(a, "POST", "/api/users/bob/disconnect", Value::Null).await;
        assert_eq!((st, v["closed"].as_u64()), (200, Some(3)), "{v}");
        for cl in [&mut b1, &mut b2, &mut b3] {
            assert_eq!(cl.ended().await, Ended::Closed(4001));
        }
    }

    #[actix_rt::test]
    async fn a_message_missing_from_the_bus_is_read_from_the_database_in_order() {
        let c = cluster(2).await;
        let (a, b) = (&c.nodes[0], &c.nodes[1]);
        // A third node on the same database that is not in the cluster: what
        // it stores never reaches the bus, like a publication lost while
        // Redis was away.
        let mut cfg = c.db_config.clone();
        cfg.node_id = "outsider".into();
        let outsider = TestServer::start(cfg).await;
        let (mut alice, _) = a.connect_synced("alice").await;
        let (mut bob, _) = b.connect_synced("bob").await;
        assert_eq!(
            send(&mut alice, json!({"user": "bob"}), "one", "r1").await["seq"],
            1
        );
        assert_eq!(next_message(&mut bob).await["seq"], 1);
        let (st, v) = api(
            &outsider,
            "POST",
            "/api/messages",
            json!({"from": "alice", "to": {"user": "bob"}, "body": "two"}),
        )
        .await;
        assert_eq!((st, v["seq"].as_i64()), (201, Some(2)), "{v}");
        assert_eq!(
            send(&mut alice, json!({"user": "bob"}), "three", "r3").await["seq"],
            3
        );
        let m = next_message(&mut bob).await;
        assert_eq!(
            (m["seq"].as_i64(), m["body"].as_str()),
            (Some(2), Some("two")),
            "the gap, read from the database"
        );
        let m = next_message(&mut bob).await;
        assert_eq!(
            (m["seq"].as_i64(), m["body"].as_str()),
            (Some(3), Some("three"))
        );
    }

    #[actix_rt::test]
    async fn messages_racing_on_the_bus_reach_a_new_conversation_in_order() {
        use chat_hub::cluster::BusMsg;
        use redis::AsyncCommands;
        let c = cluster(2).await;
        let (mut bob, _) = c.nodes[1].connect_synced("bob").await;
        // Another node's messages 2 and 1 of a conversation new to node 1,
        // in that order (two writers racing): bob still gets 1, then 2.
        let client = redis::Client::open(redis_url()).expect("redis url");
        let mut r = client
            .get_multiplexed_async_connection()
            .await
            .expect("redis");
        for seq in [2, 1] {
            let frame = json!({"type": "message", "conv": "dm:bob:zoe", "seq": seq, "from": "zoe",
                "to": {"user": "bob"}, "body": format!("m{seq}"), "ts": 1});
            let msg = BusMsg::Msg {
                node: "node0".into(),
                conv: "dm:bob:zoe".into(),
                seq,
                frame: frame.to_string(),
            };
            let payload = serde_json::to_string(&msg).expect("json");
            let _: i64 = r
                .publish(format!("{}:u:bob", c.prefix), payload)
                .await
                .expect("publish");
        }
        assert_eq!(next_message(&mut bob).await["seq"], 1);
        assert_eq!(next_message(&mut bob).await["seq"], 2);
    }
}
