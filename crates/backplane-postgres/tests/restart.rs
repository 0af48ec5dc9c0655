//! Outages: PostgreSQL stopped and started, or crashed, mid-stream; the listener's
//! connection killed; a doorbell that never rang. Every message published before and
//! during the outage (held in the outbox) arrives exactly once.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{Origin, Recorder, fresh_schema};
use switchboard_core::{Address, Backplane, Health, NodeId};
use switchboard_postgres::{PostgresBackplane, PostgresConfig};
use switchboard_testkit_postgres::PostgresServer;

const BOUND: Duration = Duration::from_secs(30);

struct Pair {
    a: Arc<PostgresBackplane>,
    b: Arc<PostgresBackplane>,
    origin: Arc<Origin>,
    target: NodeId,
    inbox_b: Arc<Recorder>,
    room: Address,
}

async fn pair(server: &PostgresServer, schema: &str, poll: Duration) -> Pair {
    let config = || {
        PostgresConfig::new(server.url())
            .with_schema(schema)
            .with_poll_interval(poll)
            .with_command_timeout(Duration::from_millis(500))
            .with_buffer_age(Duration::from_secs(20))
    };
    let a = Arc::new(PostgresBackplane::new(config()).expect("config"));
    let b = Arc::new(PostgresBackplane::new(config()).expect("config"));
    let origin = Arc::new(Origin::new(&format!("{schema}-a")));
    let target = NodeId::new(&format!("{schema}-b")).expect("node id");
    let inbox_b = Recorder::new();
    a.start(&origin.node, Recorder::new())
        .await
        .expect("start a");
    b.start(&target, inbox_b.clone()).await.expect("start b");
    let room = Address::Group(Arc::from("room"));
    b.subscribe(&room).await.expect("subscribe");
    Pair {
        a,
        b,
        origin,
        target,
        inbox_b,
        room,
    }
}

impl Pair {
    /// Publishes `n` messages (alternately to the node and the room) one after another.
    async fn send(&self, n: usize, label: &str) {
        for k in 0..n {
            let to = if k % 2 == 0 {
                Address::Node(self.target.clone())
            } else {
                self.room.clone()
            };
            let message = self.origin.message(to, format!("{label} {k}"));
            self.a.publish(&message).await.expect("publish");
        }
    }

    /// Every message arrived exactly once, in publish order.
    fn check(&self, total: usize) {
        let counts = self.inbox_b.counts();
        assert_eq!(counts.len(), total, "distinct messages");
        assert!(counts.values().all(|&n| n == 1), "a message arrived twice");
        let seqs: Vec<u64> = self.inbox_b.all().iter().map(|m| m.id.seq).collect();
        let mut sorted = seqs.clone();
        sorted.sort_unstable();
        assert_eq!(seqs, sorted, "messages from one sender arrive in order");
    }

    async fn stop(&self) {
        self.a.stop().await;
        self.b.stop().await;
    }
}

async fn wait_health(plane: &PostgresBackplane, up: bool) {
    let deadline = tokio::time::Instant::now() + BOUND;
    while (plane.health() == Health::Up) != up {
        assert!(
            tokio::time::Instant::now() < deadline,
            "health stayed {:?}",
            plane.health()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn blocking(f: impl FnOnce() + Send + 'static) {
    tokio::task::spawn_blocking(f)
        .await
        .expect("the server call");
}

async fn outage(crash: bool) {
    let server = Arc::new(PostgresServer::start());
    let schema = fresh_schema(if crash { "crash" } else { "restart" });
    let pair = Arc::new(pair(&server, &schema, Duration::from_millis(500)).await);
    pair.send(100, "before").await;
    pair.inbox_b.wait_for(100, BOUND).await;

    let down = Arc::clone(&server);
    blocking(move || {
        if crash {
            down.stop_immediately();
        } else {
            down.stop();
        }
    })
    .await;
    // Published while PostgreSQL is down: the calls wait in the outbox.
    let during = {
        let pair = Arc::clone(&pair);
        tokio::spawn(async move { pair.send(50, "during").await })
    };
    wait_health(&pair.a, false).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        !during.is_finished(),
        "publishing finished while PostgreSQL was down"
    );
    let up = Arc::clone(&server);
    blocking(move || up.start_again()).await;
    tokio::time::timeout(BOUND, during)
        .await
        .expect("the buffered publications are answered")
        .expect("the publisher task");
    pair.send(50, "after").await;
    pair.inbox_b.wait_for(200, BOUND).await;
    wait_health(&pair.a, true).await;
    wait_health(&pair.b, true).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    pair.check(200);
    pair.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_lost_or_doubled_across_a_postgres_restart() {
    outage(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_lost_or_doubled_across_a_postgres_crash() {
    outage(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_listener_catches_up_when_it_reconnects() {
    let server = PostgresServer::shared();
    let schema = fresh_schema("listener");
    // A poll far beyond the test's bound: only catch-up and doorbells can deliver.
    let pair = pair(&server, &schema, Duration::from_secs(600)).await;
    pair.send(20, "before").await;
    pair.inbox_b.wait_for(20, BOUND).await;
    for round in 0..3 {
        server
            .psql(
                "postgres",
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                 WHERE query LIKE 'LISTEN%' AND pid <> pg_backend_pid()",
            )
            .expect("terminate the listeners");
        pair.send(20, &format!("round {round}")).await;
    }
    pair.inbox_b.wait_for(80, BOUND).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    pair.check(80);
    pair.stop().await;
    server
        .psql("postgres", &format!("DROP SCHEMA \"{schema}\" CASCADE"))
        .expect("drop the schema");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_whose_doorbell_never_rang_arrives_by_the_poll() {
    let server = PostgresServer::shared();
    let schema = fresh_schema("poll");
    let pair = pair(&server, &schema, Duration::from_millis(300)).await;
    let message = pair
        .origin
        .message(Address::Node(pair.target.clone()), "no doorbell");
    let hex: String = message
        .encode()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    server
        .psql(
            "postgres",
            &format!(
                "INSERT INTO \"{schema}\".inbox (target, writer, wseq, payload) \
                 VALUES ('{}', 'by-hand', 1, '\\x{hex}'::bytea)",
                pair.target
            ),
        )
        .expect("insert a row without NOTIFY");
    pair.inbox_b.wait_for(1, Duration::from_secs(5)).await;
    assert_eq!(pair.inbox_b.all(), vec![message]);
    pair.stop().await;
    server
        .psql("postgres", &format!("DROP SCHEMA \"{schema}\" CASCADE"))
        .expect("drop the schema");
}
