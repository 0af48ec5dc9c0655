//! The sql store under the real server: `switchboard serve --store sql` processes killed
//! with SIGKILL on SQLite and on PostgreSQL (no ghost users once the lease is over, and none
//! visible from the moment it expires), the `users` and `connections` commands reading the
//! database directly, and a PostgreSQL that goes away and comes back under a running hub.

mod common;

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{
    PATIENCE, ServerProcess, TestServer, chat, check_outage_answers, eventually, not_connected,
    send_chat,
};
use serde_json::{Value, json};
use switchboard::HubOptions;
use switchboard_core::testkit::node;
use switchboard_core::{ConnectionStore, PageRequest, UserId};
use switchboard_sql::{SqlConfig, SqlStore};
use switchboard_testkit_postgres::PostgresServer;

/// The lease of every node these tests start.
const LEASE_SECONDS: u64 = 2;

/// A `switchboard serve --store sql` process on `database_url`.
async fn sql_server(database_url: &str) -> ServerProcess {
    ServerProcess::start(
        &["--store", "sql", "--database-url", database_url],
        &[],
        LEASE_SECONDS,
    )
    .await
}

/// Runs `switchboard <args>` against `database_url` and parses its JSON answer.
fn operator(database_url: &str, args: &[&str]) -> Value {
    let output = Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .args(args)
        .args(["--store", "sql", "--database-url", database_url, "--json"])
        .output()
        .expect("the command runs");
    assert!(
        output.status.success(),
        "switchboard {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("JSON on stdout")
}

fn users(database_url: &str) -> Value {
    operator(database_url, &["users"])
}

/// Polls `users` until it answers `expected`, then checks it keeps answering that for a
/// little while (it must never flip back: an expired node's users are never reported).
async fn users_become(database_url: &str, expected: Value, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        if users(database_url) == expected {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "users never became {expected}: {}",
            users(database_url)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for _ in 0..5 {
        assert_eq!(users(database_url), expected, "users flipped back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_killed_server_leaves_no_ghost_users_and_restarts_clean() {
    let dir = std::env::temp_dir().join(format!("switchboard-sqlite-crash-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a directory");
    let url = format!("sqlite://{}", dir.join("switchboard.db").display());

    let mut first = sql_server(&url).await;
    let _alice1 = first.connect("alice").await;
    let _alice2 = first.connect("alice").await;
    let _bob = first.connect("bob").await;
    assert_eq!(users(&url), json!(["alice", "bob"]));
    let connections = operator(&url, &["connections", "alice"]);
    let rows = connections.as_array().expect("an array");
    assert_eq!(rows.len(), 2, "{connections}");
    for row in rows {
        for field in ["id", "node", "user_agent", "connected_at"] {
            assert!(row.get(field).is_some(), "{field} missing in {row}");
        }
        assert!(
            row["id"].as_str().is_some_and(|id| id.contains('~')),
            "{row}"
        );
    }

    first.kill();
    let killed_at = Instant::now();
    // The records outlive the process until its lease runs out; then they stop counting at
    // once, before any sweep.
    users_become(&url, json!([]), Duration::from_secs(LEASE_SECONDS + 3)).await;
    assert!(
        killed_at.elapsed() >= Duration::from_millis(LEASE_SECONDS * 1000 / 3),
        "the records counted for a while after the kill"
    );

    let second = sql_server(&url).await;
    let mut carol = second.connect("carol").await;
    assert_eq!(
        send_chat(&mut carol, "1", "alice", "hi").await[0],
        not_connected("alice")
    );
    assert_eq!(users(&url), json!(["carol"]));
    drop(second);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_two_nodes_one_killed_the_other_sweeps_its_rows() {
    let pg = PostgresServer::start();
    let url = pg.url();
    let a = sql_server(&url).await;
    let mut b = sql_server(&url).await;
    let mut alice = a.connect("alice").await;
    let _bob = b.connect("bob").await;
    let _bob2 = b.connect("bob").await;
    assert_eq!(users(&url), json!(["alice", "bob"]));
    // alice on node A reaches bob on node B through the store (no backplane: the message is
    // reported, not delivered, but bob counts as connected).
    let first = send_chat(&mut alice, "1", "bob", "hi").await;
    assert_ne!(first[0], not_connected("bob"), "{first:?}");

    b.kill();
    users_become(
        &url,
        json!(["alice"]),
        Duration::from_secs(LEASE_SECONDS + 3),
    )
    .await;
    // From then on, bob is never reported reachable.
    for i in 0..5 {
        let answer = send_chat(&mut alice, &format!("after{i}"), "bob", "still there?").await;
        assert_eq!(answer[0], not_connected("bob"), "{answer:?}");
    }
    // Node A's maintenance sweeps B's rows out of the table.
    let deadline = Instant::now() + Duration::from_secs(LEASE_SECONDS * 3 + 5);
    loop {
        let left = pg
            .psql(
                "postgres",
                "SELECT count(*) FROM connections WHERE user_id = 'bob'",
            )
            .expect("counts");
        if left.trim() == "0" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "node B's rows were never swept: {left}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        pg.psql(
            "postgres",
            "SELECT count(*) FROM users WHERE user_id = 'bob'"
        )
        .expect("counts")
        .trim(),
        "0",
        "bob's user row went with his connections"
    );
    drop(a);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_outage_fails_fast_and_is_reconciled_when_it_returns() {
    let pg = PostgresServer::start();
    let config = SqlConfig::new(pg.url()).with_acquire_timeout(Duration::from_millis(500));
    let store: Arc<dyn ConnectionStore> =
        Arc::new(SqlStore::open(config).await.expect("the store opens"));
    let options = HubOptions::default()
        .with_lease(Duration::from_secs(3))
        .with_store_timeout(Duration::from_secs(2));
    let server = TestServer::start_node(node("sqlnode"), store.clone(), None, options).await;
    let mut alice = server.connect("alice").await;
    let mut bob = server.connect("bob").await;
    let leaving = server.connect("dave").await;
    assert_eq!(
        send_chat(&mut bob, "0", "alice", "before").await.len(),
        1,
        "only the completion"
    );
    assert_eq!(alice.next_message().await, Some(chat("bob: before")));

    pg.stop();
    check_outage_answers(&server, &mut bob, "alice", leaving, "erin", PATIENCE).await;
    pg.start_again();
    // The pool recovers by itself, the pending removal is retried, and the store matches
    // the node again.
    eventually(
        "dave's record is removed once the database is back",
        || async {
            let page = store.users(PageRequest::first(10)).await;
            page.is_ok_and(|p| {
                p.users.iter().map(UserId::as_str).collect::<Vec<_>>() == ["alice", "bob"]
            })
        },
    )
    .await;
    assert_eq!(
        send_chat(&mut bob, "2", "alice", "after").await.len(),
        1,
        "only the completion"
    );
    assert_eq!(alice.next_message().await, Some(chat("bob: after")));
    let mut erin = server.connect("erin").await;
    assert_eq!(
        send_chat(&mut erin, "3", "bob", "hello").await.len(),
        1,
        "only the completion"
    );
    assert_eq!(bob.next_message().await, Some(chat("erin: hello")));
}
