//! Payloads around NOTIFY's 8000-byte limit and at the configured maximum arrive intact:
//! they travel in table rows, never in a notification.

mod common;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::{Origin, Recorder, fresh_schema};
use switchboard_core::{Address, Backplane, BackplaneError};
use switchboard_postgres::{PostgresBackplane, PostgresConfig};
use switchboard_testkit_postgres::PostgresServer;

const MAX: usize = 100_000;

fn pattern(len: usize) -> Bytes {
    (0..len)
        .map(|i| (i as u8) ^ ((i >> 8) as u8).wrapping_mul(31))
        .collect::<Vec<u8>>()
        .into()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payloads_around_notifys_limit_and_at_the_maximum_arrive_intact() {
    let server = PostgresServer::shared();
    let schema = fresh_schema("payloads");
    let config = || {
        PostgresConfig::new(server.url())
            .with_schema(schema.clone())
            .with_max_payload(MAX)
    };
    let a = PostgresBackplane::new(config()).expect("config");
    let b = PostgresBackplane::new(config()).expect("config");
    let origin = Origin::new("payload-a");
    let target = switchboard_core::NodeId::new("payload-b").expect("node id");
    let (inbox_a, inbox_b) = (Recorder::new(), Recorder::new());
    a.start(&origin.node, inbox_a).await.expect("start a");
    b.start(&target, inbox_b.clone()).await.expect("start b");
    let room = Address::Group(Arc::from("room"));
    b.subscribe(&room).await.expect("subscribe");

    let mut sent = Vec::new();
    for size in [7_999, 8_000, 8_001, MAX] {
        for to in [Address::Node(target.clone()), room.clone()] {
            let message = origin.message(to, pattern(size));
            let reach = a.publish(&message).await.expect("publish");
            assert_eq!(reach.nodes, Some(1), "{size} bytes");
            sent.push(message);
        }
    }
    for to in [Address::Node(target.clone()), room.clone()] {
        let message = origin.message(to.clone(), pattern(MAX + 1));
        match a.publish(&message).await {
            Err(e @ BackplaneError::TooLarge { size, max }) => {
                assert_eq!((size, max), (MAX + 1, MAX));
                assert!(!e.is_transient());
                assert!(e.to_string().contains("at most 100000"), "{e}");
            }
            other => panic!(
                "{} bytes to {to} should be TooLarge, got {other:?}",
                MAX + 1
            ),
        }
    }
    inbox_b.wait_for(sent.len(), Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        inbox_b.all(),
        sent,
        "every size arrives once, intact, in order"
    );
    a.stop().await;
    b.stop().await;
    server
        .psql("postgres", &format!("DROP SCHEMA \"{schema}\" CASCADE"))
        .expect("drop the schema");
}
