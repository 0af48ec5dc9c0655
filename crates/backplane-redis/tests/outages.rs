//! Outages, bounds and credentials: what a Redis backplane does when Redis is down, slow,
//! picky about passwords, or asked for too much.

mod common;

use std::net::TcpListener;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::{WAIT, message, namespace, node, started, wait_health};
use switchboard_core::{Address, Backplane, BackplaneError, Health, NodeId};
use switchboard_redis::testing::RedisServer;
use switchboard_redis::{RedisBackplane, RedisConfig};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};

/// Counts the warnings the backplane logs.
struct CountWarnings(Arc<AtomicUsize>);

impl<S: Subscriber> Layer<S> for CountWarnings {
    fn on_event(&self, event: &Event<'_>, _: Context<'_, S>) {
        let meta = event.metadata();
        if *meta.level() == Level::WARN && meta.target().starts_with("switchboard_redis") {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
}

fn closed_port_url() -> String {
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .expect("a free port");
    format!("redis://127.0.0.1:{port}/")
}

fn to_self(me: &NodeId, seq: u64, text: &str) -> switchboard_core::Message {
    message(me, seq, Address::Node(me.clone()), text.to_owned())
}

/// Redis stops: health goes down, a publication waits and fails after the buffer age with a
/// transient error, one warning is logged; Redis comes back: health is up, messages flow.
// One thread, so the test's log subscriber sees the backplane's tasks.
#[tokio::test(flavor = "current_thread")]
async fn an_outage_fails_publications_transiently_and_ends_by_itself() {
    let warnings = Arc::new(AtomicUsize::new(0));
    let subscriber = tracing_subscriber::registry().with(CountWarnings(Arc::clone(&warnings)));
    let _guard = tracing::subscriber::set_default(subscriber);

    let server = RedisServer::start();
    let config = RedisConfig::new(server.url())
        .with_channel_names(namespace("o"))
        .with_buffer_age(Duration::from_secs(1))
        .with_command_timeout(Duration::from_millis(500));
    let (plane, inbox) = started(config, "solo").await;
    let me = node("solo");
    wait_health(&*plane, true).await;
    plane
        .publish(&to_self(&me, 1, "before"))
        .await
        .expect("publishes");
    inbox.wait_for(1).await;
    assert_eq!(
        warnings.load(Ordering::SeqCst),
        0,
        "no warning while Redis is up"
    );

    server.stop();
    wait_health(&*plane, false).await;
    let Health::Down(reason) = plane.health() else {
        panic!("health went down");
    };
    assert!(reason.contains("link"), "{reason}");
    let failed = tokio::time::timeout(WAIT, plane.publish(&to_self(&me, 2, "lost")))
        .await
        .expect("the publication answers");
    match failed {
        Err(e @ BackplaneError::Backlogged { .. }) => assert!(e.is_transient()),
        other => panic!("a publication while Redis is down should be Backlogged, got {other:?}"),
    }

    server.restart();
    wait_health(&*plane, true).await;
    plane
        .publish(&to_self(&me, 3, "after"))
        .await
        .expect("publishes once Redis is back");
    inbox.wait_for(2).await;
    assert_eq!(inbox.texts(), ["before", "after"]);
    assert_eq!(
        warnings.load(Ordering::SeqCst),
        1,
        "one warning for the whole outage, not one per link or message"
    );
    plane.stop().await;
}

/// A full outbox refuses at once: by count while the first entry waits, and by bytes.
#[tokio::test(flavor = "current_thread")]
async fn a_full_outbox_refuses_at_once() {
    let config = RedisConfig::new(closed_port_url())
        .with_buffer_messages(1)
        .with_buffer_bytes(1_000)
        .with_buffer_age(Duration::from_secs(2))
        .with_command_timeout(Duration::from_millis(200));
    let (plane, _inbox) = started(config, "full").await;
    assert!(matches!(plane.health(), Health::Down(_)));
    let me = node("full");
    let waiting = {
        let (plane, me) = (Arc::clone(&plane), me.clone());
        tokio::spawn(async move { plane.publish(&to_self(&me, 1, "waits")).await })
    };
    // On this one thread, the spawned publication runs up to its wait for the answer, with
    // its entry in the outbox.
    tokio::task::yield_now().await;
    let refused = tokio::time::timeout(WAIT, plane.publish(&to_self(&me, 2, "refused")))
        .await
        .expect("answers");
    assert!(
        matches!(refused, Err(BackplaneError::Backlogged { .. })),
        "{refused:?}"
    );
    assert!(!waiting.is_finished(), "the first publication still waits");
    let first = tokio::time::timeout(WAIT, waiting)
        .await
        .expect("the first publication answers")
        .expect("the task ends");
    match first {
        Err(e @ BackplaneError::Backlogged { .. }) => assert!(e.is_transient()),
        other => panic!("expected Backlogged after the buffer age, got {other:?}"),
    }
    // The outbox is empty again; a message larger than its byte bound is refused at once.
    let big = message(&me, 3, Address::Node(me.clone()), vec![b'x'; 2_000]);
    let refused = tokio::time::timeout(WAIT, plane.publish(&big))
        .await
        .expect("answers");
    assert!(
        matches!(refused, Err(BackplaneError::Backlogged { .. })),
        "{refused:?}"
    );
    plane.stop().await;
}

/// A payload over the limit is refused before anything is queued: the endpoint cannot reach
/// Redis and still answers `TooLarge`, not `Backlogged`.
#[tokio::test(flavor = "current_thread")]
async fn payloads_over_the_limit_fail_without_redis() {
    let config = RedisConfig::new(closed_port_url())
        .with_max_payload(10)
        .with_buffer_age(Duration::from_secs(20));
    let (plane, _inbox) = started(config, "big").await;
    let me = node("big");
    for to in [Address::Node(me.clone()), Address::All] {
        let result = tokio::time::timeout(WAIT, plane.publish(&message(&me, 1, to, vec![0u8; 11])))
            .await
            .expect("answers without waiting for Redis");
        match result {
            Err(e @ BackplaneError::TooLarge { size: 11, max: 10 }) => assert!(!e.is_transient()),
            other => panic!("expected TooLarge, got {other:?}"),
        }
    }
    assert_eq!(plane.capabilities().max_payload, 10);
    plane.stop().await;
}

/// The right password works; a wrong one, or none, makes `start` fail permanently and say
/// why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_are_checked_at_start() {
    let server = RedisServer::start_with_password("s3cret");
    let names = namespace("a");
    let config = RedisConfig::new(server.url()).with_channel_names(names.clone());
    let (plane, inbox) = started(config, "auth").await;
    let me = node("auth");
    let reach = plane
        .publish(&to_self(&me, 1, "hello"))
        .await
        .expect("publishes");
    assert_eq!(reach.nodes, Some(1));
    inbox.wait_for(1).await;
    plane.stop().await;

    let port = server.port();
    for url in [
        format!("redis://:wrong@127.0.0.1:{port}/"),
        format!("redis://default:wrong@127.0.0.1:{port}/"),
        format!("redis://127.0.0.1:{port}/"),
    ] {
        let plane = RedisBackplane::new(RedisConfig::new(&url).with_channel_names(names.clone()))
            .expect("a valid configuration");
        let inbox = Arc::new(common::Collect::default());
        let err = tokio::time::timeout(WAIT, plane.start(&node("denied"), inbox))
            .await
            .expect("start answers")
            .expect_err("start refuses bad credentials");
        assert!(!err.is_transient(), "{url}: {err}");
        assert!(err.to_string().contains("credentials"), "{url}: {err}");
        assert!(matches!(plane.health(), Health::Down(_)));
        plane.stop().await;
    }
}

/// A Redis that stops answering writes: a publication answers within the buffer age plus
/// one command timeout, with a transient error, and the backplane works again afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_redis_bounds_publish_latency() {
    let server = RedisServer::start();
    let buffer_age = Duration::from_millis(500);
    let command_timeout = Duration::from_millis(500);
    let config = RedisConfig::new(server.url())
        .with_channel_names(namespace("s"))
        .with_buffer_age(buffer_age)
        .with_command_timeout(command_timeout);
    let (plane, inbox) = started(config, "slow").await;
    let me = node("slow");
    server
        .command(&["CLIENT", "PAUSE", "3000", "WRITE"])
        .await
        .expect("CLIENT PAUSE");
    // The bound under test, with room for scheduling on a busy machine.
    let bound = buffer_age + command_timeout + Duration::from_millis(500);
    let result = tokio::time::timeout(bound, plane.publish(&to_self(&me, 1, "paused")))
        .await
        .unwrap_or_else(|_| panic!("the publication did not answer within {bound:?}"));
    let err = result.expect_err("Redis does not write while paused");
    assert!(err.is_transient(), "{err}");
    // Once the pause is over, publications succeed again.
    let mut seq = 2;
    tokio::time::timeout(WAIT, async {
        loop {
            if plane.publish(&to_self(&me, seq, "resumed")).await.is_ok() {
                return;
            }
            seq += 1;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("publications succeed after the pause");
    // The refused publication may still arrive (Redis may run it once the pause ends; see
    // the crate documentation); the one that succeeded must.
    tokio::time::timeout(WAIT, async {
        while !inbox.texts().iter().any(|t| t == "resumed") {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the publication after the pause arrives");
    plane.stop().await;
}

/// `rediss://` works against a TLS-only Redis whose certificate a private CA signed, and a
/// client that does not trust that CA cannot connect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_urls_speak_tls() {
    let server = RedisServer::start_tls();
    let ca = server
        .tls_root_certificate()
        .expect("a TLS server has a CA");
    let config = RedisConfig::new(server.url())
        .with_channel_names(namespace("t"))
        .with_tls_root_certificate(ca);
    let (plane, inbox) = started(config, "tls").await;
    let me = node("tls");
    let reach = plane
        .publish(&to_self(&me, 1, "over TLS"))
        .await
        .expect("publishes over TLS");
    assert_eq!(reach.nodes, Some(1));
    inbox.wait_for(1).await;
    assert_eq!(plane.health(), Health::Up);
    plane.stop().await;

    // Without the CA, the system's roots do not vouch for the certificate.
    let untrusting = RedisConfig::new(server.url())
        .with_command_timeout(Duration::from_millis(500))
        .with_buffer_age(Duration::from_millis(500));
    let (plane, _inbox) = started(untrusting, "tls-untrusting").await;
    assert!(matches!(plane.health(), Health::Down(_)));
    plane.stop().await;
}
