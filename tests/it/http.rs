//! The HTTP side end to end: the server API (every endpoint, every error
//! status), health and readiness, metrics, the dev sign-in and the OpenAPI
//! document checked against the real routes.

use std::sync::Arc;
use std::time::Duration;

use actix::Actor;
use serde_json::{json, Value};

use crate::common::*;

fn code(v: &Value) -> &str {
    v["code"].as_str().unwrap_or("")
}

backend_tests! {
    async fn the_api_needs_the_key(db) {
        let s = TestServer::start(db.config()).await;
        for (headers, what) in [
            (vec![], "no key"),
            (vec![("Authorization", "Bearer wrong-key-0123456789")], "wrong key"),
            (vec![("Authorization", "Basic dGVzdDp0ZXN0")], "wrong scheme"),
        ] {
            let (st, body) = http_request(s.addr, "GET", "/api/groups/team", &headers, "").await;
            let v: Value = serde_json::from_str(&body).unwrap();
            assert_eq!((st, code(&v)), (401, "unauthorized"), "{what}");
        }
        // Unset key: the API answers 401 to everything, even the right-looking key.
        let mut cfg = db.config();
        cfg.api_key = None;
        let off = TestServer::start(cfg).await;
        let (st, v) = api(&off, "POST", "/api/messages", json!({"from":"a","to":{"user":"b"},"body":"x"})).await;
        assert_eq!((st, code(&v)), (401, "unauthorized"));
    }

    async fn groups_through_the_api(db) {
        let s = TestServer::start(db.config()).await;
        let (mut bob, _) = s.connect_synced("bob").await;
        let (st, v) = api(&s, "POST", "/api/groups", json!({"group":"team","name":"Team","owner":"alice","members":["bob"]})).await;
        assert_eq!(st, 201, "{v}");
        assert_eq!(v, json!({"group":"team","name":"Team","owner":"alice","members":["alice","bob"]}));
        let ev = bob.recv_main().await;
        assert_eq!((ev["event"].as_str(), ev["by"].clone()), (Some("created"), Value::Null));
        let (st, v) = api(&s, "POST", "/api/groups", json!({"group":"team","owner":"carol"})).await;
        assert_eq!((st, code(&v)), (409, "conflict"));
        let (st, v) = api(&s, "POST", "/api/groups", json!({"group":"bad id","owner":"carol"})).await;
        assert_eq!((st, code(&v)), (400, "bad_request"));
        let (st, body) = http_request(s.addr, "POST", "/api/groups", &[("Authorization", &format!("Bearer {API_KEY}")), ("Content-Type", "application/json")], "{not json").await;
        assert_eq!((st, code(&serde_json::from_str(&body).unwrap())), (400, "bad_request"));
        let (st, v) = api(&s, "GET", "/api/groups/team", Value::Null).await;
        assert_eq!((st, v["members"].clone()), (200, json!(["alice", "bob"])));
        let (st, v) = api(&s, "GET", "/api/groups/nope", Value::Null).await;
        assert_eq!((st, code(&v)), (404, "not_found"));
        let (st, _) = api(&s, "PUT", "/api/groups/team/members/carol", Value::Null).await;
        assert_eq!(st, 204);
        let ev = bob.recv_main().await;
        assert_eq!((ev["event"].as_str(), ev["user"].as_str(), ev["by"].clone()), (Some("added"), Some("carol"), Value::Null));
        let (st, v) = api(&s, "PUT", "/api/groups/team/members/carol", Value::Null).await;
        assert_eq!((st, code(&v)), (409, "conflict"));
        let (st, v) = api(&s, "PUT", "/api/groups/nope/members/carol", Value::Null).await;
        assert_eq!((st, code(&v)), (404, "not_found"));
        let (st, v) = api(&s, "PUT", "/api/groups/team/members/no%20pe", Value::Null).await;
        assert_eq!((st, code(&v)), (400, "bad_request"));
        let (st, v) = api(&s, "DELETE", "/api/groups/team/members/alice", Value::Null).await;
        assert_eq!((st, code(&v)), (403, "forbidden"), "the owner stays");
        let (st, v) = api(&s, "DELETE", "/api/groups/team/members/zed", Value::Null).await;
        assert_eq!((st, code(&v)), (404, "not_found"));
        let (st, _) = api(&s, "DELETE", "/api/groups/team/members/bob", Value::Null).await;
        assert_eq!(st, 204);
        let ev = bob.recv_main().await;
        assert_eq!((ev["event"].as_str(), ev["user"].as_str()), (Some("removed"), Some("bob")), "the removed user hears it");
    }

    async fn publishing_through_the_api(db) {
        let mut cfg = db.config();
        cfg.max_body_bytes = 100;
        let s = TestServer::start(cfg).await;
        let (mut alice, _) = s.connect_synced("alice").await;
        let (mut bob, _) = s.connect_synced("bob").await;
        let (st, v) = api(&s, "POST", "/api/messages", json!({"from":"alice","to":{"user":"bob"},"body":"from the backend","client_id":"b-1"})).await;
        assert_eq!((st, v["conv"].as_str(), v["seq"].as_i64()), (201, Some("dm:alice:bob"), Some(1)), "{v}");
        // As if alice had sent it: bob and alice's sessions all get the message.
        for c in [&mut bob, &mut alice] {
            let m = c.recv_main().await;
            assert_eq!((m["type"].as_str(), m["from"].as_str(), m["body"].as_str(), m["client_id"].as_str()), (Some("message"), Some("alice"), Some("from the backend"), Some("b-1")));
        }
        let (st, v) = api(&s, "POST", "/api/messages", json!({"from":"alice","to":{"user":"bob"},"body":"again","client_id":"b-1"})).await;
        assert_eq!((st, v["seq"].as_i64()), (201, Some(1)), "idempotent like a send");
        let (st, v) = api(&s, "POST", "/api/messages", json!({"from":"alice","to":{"user":"bob"},"body":"x".repeat(101)})).await;
        assert_eq!((st, code(&v)), (413, "too_large"));
        let (st, v) = api(&s, "POST", "/api/messages", json!({"from":"alice","to":{"user":"bob"},"body":""})).await;
        assert_eq!((st, code(&v)), (400, "bad_request"));
        let (st, v) = api(&s, "POST", "/api/messages", json!({"from":"al ice","to":{"user":"bob"},"body":"x"})).await;
        assert_eq!((st, code(&v)), (400, "bad_request"));
        let (st, v) = api(&s, "POST", "/api/messages", json!({"from":"alice","to":{"group":"nope"},"body":"x"})).await;
        assert_eq!((st, code(&v)), (404, "not_found"));
        api(&s, "POST", "/api/groups", json!({"group":"team","owner":"carol"})).await;
        let (st, v) = api(&s, "POST", "/api/messages", json!({"from":"alice","to":{"group":"team"},"body":"x"})).await;
        assert_eq!((st, code(&v)), (403, "forbidden"));
    }

    async fn disconnecting_a_user_closes_every_session_with_4001(db) {
        let s = TestServer::start(db.config()).await;
        let (mut b1, _) = s.connect_synced("bob").await;
        let (mut b2, _) = s.connect_synced("bob").await;
        let (st, v) = api(&s, "POST", "/api/users/bob/disconnect", Value::Null).await;
        assert_eq!((st, v["closed"].as_u64()), (200, Some(2)));
        assert_eq!(b1.ended().await, Ended::Closed(4001));
        assert_eq!(b2.ended().await, Ended::Closed(4001));
        let (st, v) = api(&s, "POST", "/api/users/nobody/disconnect", Value::Null).await;
        assert_eq!((st, v["closed"].as_u64()), (200, Some(0)));
    }

    async fn health_metrics_and_unknown_paths(db) {
        let s = TestServer::start(db.config()).await;
        assert_eq!(http_request(s.addr, "GET", "/healthz", &[], "").await.0, 200);
        assert_eq!(http_request(s.addr, "GET", "/readyz", &[], "").await.0, 200);
        let (st, body) = http_request(s.addr, "GET", "/no/such/thing", &[], "").await;
        assert_eq!((st, code(&serde_json::from_str(&body).unwrap())), (404, "not_found"));
        let before = scrape(&s).await;
        let (mut a, _) = s.connect_synced("alice").await;
        let (mut b, _) = s.connect_synced("bob").await;
        for i in 0..3 {
            a.send(json!({"type":"send","to":{"user":"bob"},"body":format!("m{i}")})).await;
            assert_eq!(a.recv_main().await["type"], "sent");
            assert_eq!(b.recv_main().await["type"], "message");
        }
        a.send(json!({"type":"nope"})).await;
        assert_eq!(a.recv_main().await["code"], "unknown_type");
        let after = scrape(&s).await;
        let delta = |name: &str| metric(&after, name) - metric(&before, name);
        assert!(delta("chat_hub_messages_stored_total") >= 3.0);
        assert!(delta("chat_hub_messages_delivered_total") >= 3.0);
        assert!(delta("chat_hub_rejected_total{code=\"unknown_type\"}") >= 1.0);
        assert!(metric(&after, "chat_hub_connections_open") >= 2.0);
        assert!(metric(&after, "chat_hub_db_operation_seconds_count{op=\"store_batch\"}") >= 1.0);
        assert!(metric(&after, "chat_hub_db_pool_max") >= 1.0);
    }

    async fn the_dev_sign_in_is_off_unless_asked(db) {
        let s = TestServer::start(db.config()).await;
        let (st, body) = http_request(s.addr, "POST", "/dev/token", &[("Content-Type", "application/json")], r#"{"user":"alice"}"#).await;
        assert_eq!((st, code(&serde_json::from_str(&body).unwrap())), (404, "not_found"));
        let mut cfg = db.config();
        cfg.dev_login = true;
        let s = TestServer::start(cfg).await;
        let (st, body) = http_request(s.addr, "POST", "/dev/token", &[("Content-Type", "application/json")], r#"{"user":"alice"}"#).await;
        assert_eq!(st, 200);
        let token = serde_json::from_str::<Value>(&body).unwrap()["token"].as_str().unwrap().to_string();
        let mut c = Client::connect(&format!("ws://{}/ws?token={token}", s.addr)).await;
        assert_eq!(c.recv().await["user"], "alice");
        let (st, _) = http_request(s.addr, "POST", "/dev/token", &[("Content-Type", "application/json")], r#"{"user":"no body"}"#).await;
        assert_eq!(st, 400);
    }

    async fn readiness_follows_the_database(db) {
        // A server whose database cannot be reached: /readyz 503, /healthz 200.
        let mut cfg = db.config();
        cfg.db_timeout = Duration::from_secs(1);
        let dir = tempfile::tempdir().unwrap();
        cfg.database = if db.is_mysql() {
            chat_hub::config::DatabaseUrl::Mysql("mysql://root@127.0.0.1:1/none".into())
        } else {
            chat_hub::config::DatabaseUrl::Sqlite(dir.path().join("missing/dir/chat.db"))
        };
        cfg.jwt_secret = Some("test-secret-0123456789abcdef".into());
        let pool = chat_hub::db::build_pool(&cfg);
        let x = chat_hub::db::DbExecutor::start(1, pool.clone());
        let hub = chat_hub::hub::server::ChatServer::new(x.clone(), chat_hub::hub::server::HubConfig::from_config(&cfg), vec![]).start();
        let state = chat_hub::http::AppState {
            cfg: Arc::new(cfg.clone()),
            keys: chat_hub::auth::TokenKeys::new("test-secret-0123456789abcdef"),
            server: hub,
            db: x,
            pool,
            limits: Arc::new(chat_hub::hub::session::SessionLimits::from_config(&cfg)),
        };
        let app = actix_web::test::init_service(
            actix_web::App::new().app_data(actix_web::web::Data::new(state)).configure(chat_hub::http::routes),
        )
        .await;
        let res = actix_web::test::call_service(&app, actix_web::test::TestRequest::get().uri("/readyz").to_request()).await;
        assert_eq!(res.status(), 503);
        let v: Value = actix_web::test::read_body_json(res).await;
        assert_eq!(code(&v), "unavailable");
        let res = actix_web::test::call_service(&app, actix_web::test::TestRequest::get().uri("/healthz").to_request()).await;
        assert_eq!(res.status(), 200);
    }

    async fn the_openapi_document_matches_the_routes(db) {
        let s = TestServer::start(db.config()).await;
        let (st, doc) = api(&s, "GET", "/api/openapi.json", Value::Null).await;
        assert_eq!(st, 200);
        assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
        let mut ops = Vec::new();
        for (path, item) in doc["paths"].as_object().unwrap() {
            for method in item.as_object().unwrap().keys() {
                ops.push(format!("{} {path}", method.to_uppercase()));
            }
        }
        ops.sort();
        let expected = [
            "DELETE /api/groups/{group}/members/{user}",
            "GET /api/groups/{group}",
            "GET /api/openapi.json",
            "GET /healthz",
            "GET /metrics",
            "GET /readyz",
            "POST /api/groups",
            "POST /api/messages",
            "POST /api/users/{user}/disconnect",
            "POST /dev/token",
            "PUT /api/groups/{group}/members/{user}",
        ];
        assert_eq!(ops, expected, "every HTTP endpoint is documented, and nothing else");
        // Each documented operation is served: none falls through to the default 404.
        for op in &ops {
            let (method, path) = op.split_once(' ').unwrap();
            let path = path.replace("{group}", "g1").replace("{user}", "u1");
            let (st, body) = http_request(s.addr, method, &path, &[("Authorization", &format!("Bearer {API_KEY}")), ("Content-Type", "application/json")], "{}").await;
            assert!(!body.contains("no such endpoint"), "{op} is not routed (status {st})");
        }
    }
}

async fn scrape(s: &TestServer) -> String {
    let (st, body) = http_request(s.addr, "GET", "/metrics", &[], "").await;
    assert_eq!(st, 200);
    body
}

/// The value of a sample line `name value` (0 when absent).
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}
