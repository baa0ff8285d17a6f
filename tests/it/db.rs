//! The DbExecutor driven directly: an actix System, real messages, a real
//! database per test, on SQLite and (with `--features mysql`) MariaDB.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use actix::Addr;
use chat_hub::db::executor::*;
use chat_hub::db::models::{NewMessage, Stored};
use chat_hub::db::DbExecutor;
use chat_hub::error::{ChatError, ErrorCode};
use chat_hub::ids::{ConvKey, GroupId, Target, UserId};

use crate::common::*;

fn u(s: &str) -> UserId {
    UserId::parse(s).unwrap()
}
fn g(s: &str) -> GroupId {
    GroupId::parse(s).unwrap()
}
fn conv(s: &str) -> ConvKey {
    ConvKey::parse(s).unwrap()
}
fn msg(from: &str, to: Target, body: &str, client_id: Option<&str>) -> NewMessage {
    NewMessage {
        sender: u(from),
        to,
        body: body.into(),
        client_id: client_id.map(String::from),
        ts: chat_hub::now_ms(),
    }
}
fn dm(from: &str, to: &str, body: &str) -> NewMessage {
    msg(from, Target::User(u(to)), body, None)
}

async fn store(db: &Addr<DbExecutor>, m: NewMessage) -> Result<Stored, ChatError> {
    db.send(StoreMessage(m)).await.unwrap()
}

async fn create_group(db: &Addr<DbExecutor>, group: &str, owner: &str, members: &[&str]) {
    let op = GroupOp::Create {
        group: g(group),
        name: group.into(),
        owner: u(owner),
        members: members.iter().map(|m| u(m)).collect(),
    };
    db.send(ChangeGroup {
        by: Some(u(owner)),
        op,
    })
    .await
    .unwrap()
    .unwrap();
}

async fn group_op(
    db: &Addr<DbExecutor>,
    by: Option<&str>,
    op: GroupOp,
) -> Result<chat_hub::protocol::GroupView, ChatError> {
    db.send(ChangeGroup { by: by.map(u), op }).await.unwrap()
}

async fn backlog_all(db: &Addr<DbExecutor>, user: &str, page: i64) -> Vec<(String, i64)> {
    let mut out = Vec::new();
    let mut after = None;
    loop {
        let p = db
            .send(LoadBacklog {
                user: u(user),
                after,
                limit: page,
            })
            .await
            .unwrap()
            .unwrap();
        assert!(p.items.len() as i64 <= page, "a page is bounded");
        out.extend(p.items.iter().map(|i| (i.conv.clone(), i.seq)));
        match p.next {
            Some(n) => after = Some(n),
            None => return out,
        }
    }
}

/// Every seq of a conversation visible to `user`, oldest first (paging through history).
async fn seqs_of(db: &Addr<DbExecutor>, user: &str, c: &str) -> Vec<i64> {
    let mut out = Vec::new();
    let mut before = None;
    loop {
        let page = db
            .send(History {
                user: u(user),
                conv: conv(c),
                before_seq: before,
                limit: 200,
            })
            .await
            .unwrap()
            .unwrap();
        out.extend(page.messages.iter().map(|m| m.seq));
        before = page.messages.last().map(|m| m.seq);
        if !page.more {
            out.reverse();
            return out;
        }
    }
}

backend_tests! {
    async fn migrations_apply_and_really_revert(db) {
        use diesel::RunQueryDsl;
        let cfg = db.config();
        drop(chat_hub::db::open_pool(&cfg).unwrap());
        let mut c = chat_hub::db::conn::establish(&cfg.database, Duration::from_secs(5)).unwrap();
        let count_tables = |c: &mut chat_hub::db::DbConn| -> i64 {
            #[derive(diesel::QueryableByName)]
            struct N {
                #[diesel(sql_type = diesel::sql_types::BigInt)]
                n: i64,
            }
            let sql = if db.is_mysql() {
                "SELECT COUNT(*) AS n FROM information_schema.tables WHERE table_schema = DATABASE() AND table_name IN ('users','conversations','chat_groups','members','messages')"
            } else {
                "SELECT COUNT(*) AS n FROM sqlite_master WHERE type = 'table' AND name IN ('users','conversations','chat_groups','members','messages')"
            };
            diesel::sql_query(sql).get_result::<N>(c).unwrap().n
        };
        assert_eq!(count_tables(&mut c), 5);
        let reverted = chat_hub::db::conn::revert_all_migrations(&mut c).unwrap();
        assert_eq!(reverted.len(), 1);
        assert_eq!(count_tables(&mut c), 0, "down.sql drops everything up.sql made");
        assert_eq!(chat_hub::db::conn::run_migrations(&mut c).unwrap().len(), 1, "and up again");
        assert_eq!(count_tables(&mut c), 5);
    }

    async fn seqs_count_per_conversation(db) {
        let (x, _pool) = db.executor(2);
        for i in 1..=3 {
            let s = store(&x, dm("alice", "bob", "hi")).await.unwrap();
            assert_eq!((s.conv.to_string(), s.seq, s.duplicate), ("dm:alice:bob".to_string(), i, false));
        }
        let s = store(&x, dm("carol", "alice", "yo")).await.unwrap();
        assert_eq!((s.conv.to_string(), s.seq), ("dm:alice:carol".to_string(), 1));
        let s = store(&x, dm("bob", "alice", "back")).await.unwrap();
        assert_eq!((s.conv.to_string(), s.seq), ("dm:alice:bob".to_string(), 4));
        let s = store(&x, dm("dave", "dave", "note to self")).await.unwrap();
        assert_eq!((s.conv.to_string(), s.seq), ("dm:dave:dave".to_string(), 1));
    }

    async fn emoji_and_text_round_trip(db) {
        let (x, _pool) = db.executor(1);
        let body = "héllo 🎉👩‍👩‍👧 日本語 \u{0} 'quote\" \\ <b>";
        store(&x, dm("alice", "bob", body)).await.unwrap();
        let page = x.send(History { user: u("bob"), conv: conv("dm:alice:bob"), before_seq: None, limit: 10 }).await.unwrap().unwrap();
        assert_eq!(page.messages[0].body, body);
    }

    async fn a_batch_is_one_transaction_with_results_in_order(db) {
        let (x, _pool) = db.executor(1);
        create_group(&x, "team", "alice", &["bob"]).await;
        let batch = vec![
            dm("alice", "bob", "1"),
            msg("alice", Target::Group(g("team")), "2", None),
            msg("mallory", Target::Group(g("team")), "not a member", None),
            dm("bob", "alice", "3"),
            msg("bob", Target::Group(g("nope")), "no group", None),
            msg("bob", Target::Group(g("team")), "4", None),
        ];
        let out = x.send(StoreBatch(Arc::new(batch))).await.unwrap().unwrap();
        let got: Vec<Result<(String, i64), ErrorCode>> = out.into_iter().map(|r| r.map(|s| (s.conv.to_string(), s.seq)).map_err(|e| e.code)).collect();
        assert_eq!(got, vec![
            Ok(("dm:alice:bob".into(), 1)),
            Ok(("group:team".into(), 1)),
            Err(ErrorCode::Forbidden),
            Ok(("dm:alice:bob".into(), 2)),
            Err(ErrorCode::NotFound),
            Ok(("group:team".into(), 2)),
        ]);
        // The refused message took no number.
        assert_eq!(seqs_of(&x, "alice", "group:team").await, vec![1, 2]);
    }

    async fn client_id_makes_a_send_idempotent(db) {
        let (x, _pool) = db.executor(2);
        let first = store(&x, msg("alice", Target::User(u("bob")), "hi", Some("c-1"))).await.unwrap();
        let again = store(&x, msg("alice", Target::User(u("bob")), "hi (retry)", Some("c-1"))).await.unwrap();
        assert_eq!((again.conv.clone(), again.seq, again.ts, again.duplicate), (first.conv.clone(), first.seq, first.ts, true));
        // The same key from another sender is another message.
        let other = store(&x, msg("bob", Target::User(u("alice")), "hi", Some("c-1"))).await.unwrap();
        assert_eq!((other.seq, other.duplicate), (2, false));
        // Twice in one batch: stored once.
        let batch = vec![msg("carol", Target::User(u("bob")), "a", Some("k")), msg("carol", Target::User(u("bob")), "a", Some("k"))];
        let out = x.send(StoreBatch(Arc::new(batch))).await.unwrap().unwrap();
        let (a, b) = (out[0].clone().unwrap(), out[1].clone().unwrap());
        assert_eq!((a.seq, a.duplicate, b.seq, b.duplicate), (1, false, 1, true));
        assert_eq!(seqs_of(&x, "bob", "dm:alice:bob").await, vec![1, 2]);
        assert_eq!(seqs_of(&x, "bob", "dm:bob:carol").await, vec![1]);
    }

    async fn concurrent_writers_get_gapless_unique_seqs(db) {
        let (x, _pool) = db.executor(4);
        create_group(&x, "busy", "alice", &["bob", "carol", "dave"]).await;
        let senders = ["alice", "bob", "carol", "dave"];
        let mut futs = Vec::new();
        let mut batches = Vec::new();
        for i in 0..200 {
            let m = msg(senders[i % 4], Target::Group(g("busy")), &format!("m{i}"), Some(&format!("id-{i}")));
            futs.push(x.send(StoreMessage(m)));
            if i % 7 == 0 {
                // Mix in batches running on other executor threads at the same time.
                let b = (0..5).map(|j| msg(senders[j % 4], Target::Group(g("busy")), "b", None)).collect();
                batches.push(x.send(StoreBatch(Arc::new(b))));
            }
        }
        let (singles, batches) = futures_util::future::join(futures_util::future::join_all(futs), futures_util::future::join_all(batches)).await;
        let mut seqs = BTreeSet::new();
        let batch_results = batches.into_iter().flat_map(|b| b.unwrap().unwrap());
        for s in singles.into_iter().map(|f| f.unwrap()).chain(batch_results) {
            let s = s.unwrap();
            assert!(seqs.insert(s.seq), "seq {} given twice", s.seq);
        }
        let all = seqs_of(&x, "alice", "group:busy").await;
        assert_eq!(all.iter().copied().collect::<BTreeSet<_>>(), seqs);
        assert_eq!(all, (1..=(200 + 29 * 5) as i64).collect::<Vec<_>>());
    }

    async fn a_failed_store_takes_no_seq_and_the_executor_recovers(db) {
        let mut cfg = db.config();
        cfg.db_timeout = Duration::from_secs(1);
        let pool = chat_hub::db::open_pool(&cfg).unwrap();
        let x = DbExecutor::start(1, pool.clone());
        assert_eq!(store(&x, dm("alice", "bob", "1")).await.unwrap().seq, 1);
        // Another connection holds the conversation's row (MariaDB) or the
        // whole write lock (SQLite) past the timeout: the store must fail.
        let (locked_tx, locked) = tokio::sync::oneshot::channel();
        let blocker = std::thread::spawn({
            let cfg = cfg.clone();
            move || hold_write_lock(&cfg, Duration::from_secs(3), locked_tx)
        });
        locked.await.unwrap();
        let e = store(&x, dm("alice", "bob", "2")).await.unwrap_err();
        assert_eq!(e.code, ErrorCode::Unavailable);
        blocker.join().unwrap();
        let s = store(&x, dm("alice", "bob", "3")).await.unwrap();
        assert_eq!(s.seq, 2, "the failed message took no number");
        assert_eq!(seqs_of(&x, "bob", "dm:alice:bob").await, vec![1, 2]);
    }

    async fn backlog_is_paged_in_order_without_own_or_acked_messages(db) {
        let (x, _pool) = db.executor(2);
        create_group(&x, "team", "carol", &["bob"]).await;
        for i in 0..7 {
            store(&x, dm("alice", "bob", &format!("a{i}"))).await.unwrap();
            store(&x, msg("carol", Target::Group(g("team")), "g", None)).await.unwrap();
            store(&x, dm("bob", "alice", "own")).await.unwrap();
        }
        let all = backlog_all(&x, "bob", 3).await;
        let dm_seqs: Vec<i64> = all.iter().filter(|(c, _)| c == "dm:alice:bob").map(|(_, s)| *s).collect();
        let g_seqs: Vec<i64> = all.iter().filter(|(c, _)| c == "group:team").map(|(_, s)| *s).collect();
        assert_eq!(dm_seqs, vec![1, 3, 5, 7, 9, 11, 13], "in seq order, bob's own messages left out");
        assert_eq!(g_seqs, (1..=7).collect::<Vec<_>>());
        assert_eq!(all.len(), 14);
        x.send(Ack { user: u("bob"), conv: conv("dm:alice:bob"), seq: 9 }).await.unwrap().unwrap();
        let all = backlog_all(&x, "bob", 100).await;
        let dm_seqs: Vec<i64> = all.iter().filter(|(c, _)| c == "dm:alice:bob").map(|(_, s)| *s).collect();
        assert_eq!(dm_seqs, vec![11, 13]);
        // The sender's backlog holds bob's messages, not her own.
        let alice: Vec<i64> = backlog_all(&x, "alice", 100).await.iter().map(|(_, s)| *s).collect();
        assert_eq!(alice, vec![2, 4, 6, 8, 10, 12, 14]);
    }

    async fn acks_are_cumulative_and_validated(db) {
        let (x, _pool) = db.executor(1);
        for _ in 0..5 {
            store(&x, dm("alice", "bob", "x")).await.unwrap();
        }
        let ack = |c: &str, seq| x.send(Ack { user: u("bob"), conv: conv(c), seq });
        ack("dm:alice:bob", 4).await.unwrap().unwrap();
        ack("dm:alice:bob", 2).await.unwrap().unwrap();
        let left: Vec<i64> = backlog_all(&x, "bob", 10).await.iter().map(|(_, s)| *s).collect();
        assert_eq!(left, vec![5], "an ack never moves the position back");
        assert_eq!(ack("dm:alice:bob", 6).await.unwrap().unwrap_err().code, ErrorCode::BadRequest);
        assert_eq!(ack("dm:bob:carol", 1).await.unwrap().unwrap_err().code, ErrorCode::BadRequest);
        assert_eq!(ack("group:nope", 1).await.unwrap().unwrap_err().code, ErrorCode::BadRequest);
        ack("dm:alice:bob", 5).await.unwrap().unwrap();
        assert!(backlog_all(&x, "bob", 10).await.is_empty());
        let m = x.send(GetMembership { conv: conv("dm:alice:bob"), user: u("bob") }).await.unwrap().unwrap().unwrap();
        assert_eq!((m.joined_seq, m.left_seq, m.delivered_seq), (0, None, 5));
    }

    async fn history_pages_back_from_the_members_join(db) {
        let (x, _pool) = db.executor(1);
        create_group(&x, "team", "alice", &[]).await;
        for i in 1..=5 {
            store(&x, msg("alice", Target::Group(g("team")), &format!("{i}"), None)).await.unwrap();
        }
        group_op(&x, Some("alice"), GroupOp::Add { group: g("team"), user: u("bob") }).await.unwrap();
        for i in 6..=8 {
            store(&x, msg("alice", Target::Group(g("team")), &format!("{i}"), None)).await.unwrap();
        }
        let h = |user: &str, before, limit| x.send(History { user: u(user), conv: conv("group:team"), before_seq: before, limit });
        let p = h("alice", None, 3).await.unwrap().unwrap();
        assert_eq!(p.messages.iter().map(|m| m.seq).collect::<Vec<_>>(), vec![8, 7, 6]);
        assert!(p.more);
        let p = h("alice", Some(3), 3).await.unwrap().unwrap();
        assert_eq!(p.messages.iter().map(|m| m.seq).collect::<Vec<_>>(), vec![2, 1]);
        assert!(!p.more);
        let p = h("bob", None, 50).await.unwrap().unwrap();
        assert_eq!(p.messages.iter().map(|m| m.seq).collect::<Vec<_>>(), vec![8, 7, 6], "bob sees from his join on");
        assert!(!p.more);
        assert_eq!(h("carol", None, 5).await.unwrap().unwrap_err().code, ErrorCode::Forbidden);
        let nf = x.send(History { user: u("alice"), conv: conv("group:nope"), before_seq: None, limit: 5 }).await.unwrap();
        assert_eq!(nf.unwrap_err().code, ErrorCode::NotFound);
        let other = x.send(History { user: u("carol"), conv: conv("dm:alice:bob"), before_seq: None, limit: 5 }).await.unwrap();
        assert_eq!(other.unwrap_err().code, ErrorCode::Forbidden);
        let empty = x.send(History { user: u("carol"), conv: conv("dm:alice:carol"), before_seq: None, limit: 5 }).await.unwrap().unwrap();
        assert!(empty.messages.is_empty() && !empty.more);
    }

    async fn group_changes_check_permission_first(db) {
        let (x, _pool) = db.executor(1);
        let v = group_op(&x, Some("alice"), GroupOp::Create { group: g("team"), name: "Team".into(), owner: u("alice"), members: vec![u("bob"), u("alice")] }).await.unwrap();
        assert_eq!((v.owner.as_str(), v.members.clone()), ("alice", vec!["alice".to_string(), "bob".to_string()]));
        let code = |r: Result<chat_hub::protocol::GroupView, ChatError>| r.unwrap_err().code;
        let create_again = GroupOp::Create { group: g("team"), name: "x".into(), owner: u("carol"), members: vec![] };
        assert_eq!(code(group_op(&x, Some("carol"), create_again).await), ErrorCode::Conflict);
        // Not the owner: forbidden, whether or not the member exists.
        assert_eq!(code(group_op(&x, Some("bob"), GroupOp::Add { group: g("team"), user: u("carol") }).await), ErrorCode::Forbidden);
        assert_eq!(code(group_op(&x, Some("bob"), GroupOp::Add { group: g("team"), user: u("alice") }).await), ErrorCode::Forbidden);
        assert_eq!(code(group_op(&x, Some("bob"), GroupOp::Remove { group: g("team"), user: u("zed") }).await), ErrorCode::Forbidden);
        assert_eq!(code(group_op(&x, Some("alice"), GroupOp::Add { group: g("team"), user: u("bob") }).await), ErrorCode::Conflict);
        assert_eq!(code(group_op(&x, Some("alice"), GroupOp::Remove { group: g("team"), user: u("zed") }).await), ErrorCode::NotFound);
        assert_eq!(code(group_op(&x, Some("alice"), GroupOp::Remove { group: g("team"), user: u("alice") }).await), ErrorCode::Forbidden);
        assert_eq!(code(group_op(&x, Some("alice"), GroupOp::Leave { group: g("team") }).await), ErrorCode::Forbidden);
        assert_eq!(code(group_op(&x, Some("zed"), GroupOp::Leave { group: g("team") }).await), ErrorCode::Forbidden);
        for op in [GroupOp::Add { group: g("nope"), user: u("bob") }, GroupOp::Remove { group: g("nope"), user: u("bob") }, GroupOp::Leave { group: g("nope") }] {
            assert_eq!(code(group_op(&x, Some("alice"), op).await), ErrorCode::NotFound);
        }
        let v = group_op(&x, Some("alice"), GroupOp::Add { group: g("team"), user: u("carol") }).await.unwrap();
        assert_eq!(v.members, vec!["alice", "bob", "carol"]);
        let v = group_op(&x, Some("carol"), GroupOp::Leave { group: g("team") }).await.unwrap();
        assert_eq!(v.members, vec!["alice", "bob"]);
        // The server API (by: None) adds and removes with the backend's authority.
        group_op(&x, None, GroupOp::Add { group: g("team"), user: u("dave") }).await.unwrap();
        let v = group_op(&x, None, GroupOp::Remove { group: g("team"), user: u("bob") }).await.unwrap();
        assert_eq!(v.members, vec!["alice", "dave"]);
        assert_eq!(code(group_op(&x, None, GroupOp::Remove { group: g("team"), user: u("alice") }).await), ErrorCode::Forbidden);
        let mine = x.send(ListGroups(u("dave"))).await.unwrap().unwrap();
        assert_eq!(mine.len(), 1);
        assert!(x.send(ListGroups(u("bob"))).await.unwrap().unwrap().is_empty());
        assert_eq!(x.send(GetGroup(g("team"))).await.unwrap().unwrap().members, vec!["alice", "dave"]);
        assert_eq!(x.send(GetGroup(g("nope"))).await.unwrap().unwrap_err().code, ErrorCode::NotFound);
        assert_eq!(x.send(LoadGroups).await.unwrap().unwrap().len(), 1);
    }

    async fn a_former_member_keeps_the_messages_of_their_membership(db) {
        let (x, _pool) = db.executor(1);
        create_group(&x, "team", "alice", &["bob"]).await;
        store(&x, msg("alice", Target::Group(g("team")), "while in", None)).await.unwrap();
        group_op(&x, Some("bob"), GroupOp::Leave { group: g("team") }).await.unwrap();
        store(&x, msg("alice", Target::Group(g("team")), "after", None)).await.unwrap();
        assert_eq!(backlog_all(&x, "bob", 10).await, vec![("group:team".to_string(), 1)]);
        // Acks are bounded by the last seq before leaving.
        let ack = |seq| x.send(Ack { user: u("bob"), conv: conv("group:team"), seq });
        assert_eq!(ack(2).await.unwrap().unwrap_err().code, ErrorCode::BadRequest);
        ack(1).await.unwrap().unwrap();
        assert!(backlog_all(&x, "bob", 10).await.is_empty());
        let e = store(&x, msg("bob", Target::Group(g("team")), "let me in", None)).await.unwrap_err();
        assert_eq!(e.code, ErrorCode::Forbidden);
        let h = x.send(History { user: u("bob"), conv: conv("group:team"), before_seq: None, limit: 5 }).await.unwrap();
        assert_eq!(h.unwrap_err().code, ErrorCode::Forbidden);
    }

    async fn presence_peers_are_the_direct_conversations(db) {
        let (x, _pool) = db.executor(1);
        store(&x, dm("alice", "bob", "x")).await.unwrap();
        store(&x, dm("carol", "alice", "x")).await.unwrap();
        store(&x, dm("alice", "alice", "self")).await.unwrap();
        let mut peers: Vec<String> = x.send(UserOnline(u("alice"))).await.unwrap().unwrap().iter().map(|p| p.to_string()).collect();
        peers.sort();
        assert_eq!(peers, vec!["bob", "carol"]);
        x.send(Ping).await.unwrap().unwrap();
    }
}

/// Hold the database's write path for `hold`: the conversation row on
/// MariaDB, the database write lock on SQLite.
fn hold_write_lock(
    cfg: &chat_hub::config::Config,
    hold: Duration,
    locked: tokio::sync::oneshot::Sender<()>,
) {
    use diesel::RunQueryDsl;
    let mut c = chat_hub::db::conn::establish(&cfg.database, Duration::from_secs(5)).unwrap();
    chat_hub::db::conn::write_txn(&mut c, |c| -> Result<(), diesel::result::Error> {
        diesel::sql_query(
            "UPDATE conversations SET last_seq = last_seq WHERE conv = 'dm:alice:bob'",
        )
        .execute(c)?;
        let _ = locked.send(());
        // Holding a lock for a while is the point here: the store must time out behind it.
        std::thread::sleep(hold);
        Ok(())
    })
    .unwrap();
}

#[actix_rt::test]
async fn an_unreachable_database_is_unavailable_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let db_dir = dir.path().join("later");
    let mut cfg = TestDb::sqlite().config();
    cfg.database = chat_hub::config::DatabaseUrl::Sqlite(db_dir.join("chat.db"));
    cfg.db_timeout = Duration::from_secs(1);
    let x = DbExecutor::start(1, chat_hub::db::build_pool(&cfg));
    let e = store(&x, dm("alice", "bob", "x")).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::Unavailable);
    assert_eq!(
        x.send(Ping).await.unwrap().unwrap_err().code,
        ErrorCode::Unavailable
    );
    // The database comes back: the same executor stores again.
    std::fs::create_dir_all(&db_dir).unwrap();
    chat_hub::db::open_pool(&cfg).unwrap();
    assert_eq!(store(&x, dm("alice", "bob", "x")).await.unwrap().seq, 1);
}
