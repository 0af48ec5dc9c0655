//! A Redis restarted without its data in the middle of a stream of messages: the receiver
//! still gets every message once, in order.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use common::{WAIT, message, namespace, node, started};
use switchboard_core::{Address, Backplane, ChannelNames, Message};
use switchboard_redis::RedisConfig;
use switchboard_redis::testing::RedisServer;

const N: u64 = 2_000;

/// The number a test message carries.
fn number(message: &Message) -> u64 {
    std::str::from_utf8(&message.payload)
        .expect("UTF-8")
        .parse()
        .expect("a number")
}

/// The number of the newest entry in `inbox` (0 when empty), read behind the backplane.
async fn newest_in_stream(server: &RedisServer, inbox: &str) -> u64 {
    let reply = server
        .command(&["XREVRANGE", inbox, "+", "-", "COUNT", "1"])
        .await
        .expect("XREVRANGE");
    let entries: Vec<(String, Vec<Vec<u8>>)> =
        redis::from_redis_value(reply).expect("stream entries");
    let Some((_, fields)) = entries.first() else {
        return 0;
    };
    let encoded = fields
        .chunks_exact(2)
        .find(|pair| pair[0] == b"m")
        .map(|pair| pair[1].clone())
        .expect("an entry holds a message");
    number(&Message::decode(Bytes::from(encoded)).expect("decodes"))
}

/// Publishes `1..=N` from A to `to` at a steady pace, restarts Redis when B has about a third
/// of them, and checks B got `1..=N` exactly once, in order.
async fn survives_a_restart(to: impl Fn(&ChannelNames) -> Address, subscribe: bool) {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter("switchboard_redis=debug")
        .try_init();
    let server = Arc::new(RedisServer::start());
    let names = namespace("r");
    let config = RedisConfig::new(server.url()).with_channel_names(names.clone());
    let (a, _a_in) = started(config.clone(), "node-a").await;
    let (b, b_in) = started(config, "node-b").await;
    let address = to(&names);
    if subscribe {
        b.subscribe(&address).await.expect("subscribes");
    }
    let acked = Arc::new(AtomicU64::new(0));
    let publisher = {
        let (a, acked, address) = (Arc::clone(&a), Arc::clone(&acked), address.clone());
        tokio::spawn(async move {
            let origin = node("node-a");
            for k in 1..=N {
                let reach = a
                    .publish(&message(&origin, k, address.clone(), k.to_string()))
                    .await
                    .unwrap_or_else(|e| panic!("publish {k} failed: {e}"));
                assert_eq!(reach.nodes, Some(1), "the reach of message {k}");
                acked.store(k, Ordering::SeqCst);
                if k % 10 == 0 {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }
        })
    };
    b_in.wait_for(usize::try_from(N / 3).expect("fits")).await;
    // Hold writes so that every message Redis accepted is read before it dies: Redis has no
    // persistence, so an entry written but not yet read when it dies is lost (documented).
    server
        .command(&["CLIENT", "PAUSE", "10000", "WRITE"])
        .await
        .expect("CLIENT PAUSE");
    let inbox = names.channel(&Address::Node(node("node-b")));
    tokio::time::timeout(WAIT, async {
        loop {
            let newest = newest_in_stream(&server, &inbox).await;
            let seen = b_in.all().last().map_or(0, number);
            if newest == seen {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("B reads everything Redis accepted");
    let restarting = Arc::clone(&server);
    tokio::task::spawn_blocking(move || restarting.restart())
        .await
        .expect("restarts");
    tokio::time::timeout(WAIT * 2, publisher)
        .await
        .expect("the publisher finishes")
        .expect("every publish succeeds");
    b_in.wait_for(usize::try_from(N).expect("fits")).await;
    // A marker after the stream: once it is in, nothing of the stream is still on its way.
    let marker = message(&node("node-a"), N + 1, address.clone(), (N + 1).to_string());
    a.publish(&marker).await.expect("publishes the marker");
    b_in.wait_for(usize::try_from(N + 1).expect("fits")).await;
    let got: Vec<u64> = b_in.all().iter().map(number).collect();
    let want: Vec<u64> = (1..=N + 1).collect();
    assert_eq!(got, want, "B got every message once, in order");
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_loses_no_node_message() {
    survives_a_restart(|_| Address::Node(node("node-b")), false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_loses_no_channel_message() {
    survives_a_restart(|_| Address::Group(Arc::from("room")), true).await;
}

/// Redis drops every client connection a few times during a stream (its data stays): the
/// receiver resumes from the last entry it read and the sender resends what it was not sure
/// of, so B still gets `1..=N` exactly once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_links_resume_without_loss_or_duplicates() {
    let server = Arc::new(RedisServer::start());
    let names = namespace("k");
    let config = RedisConfig::new(server.url()).with_channel_names(names.clone());
    let (a, _a_in) = started(config.clone(), "node-a").await;
    let (b, b_in) = started(config, "node-b").await;
    let to = Address::Node(node("node-b"));
    let publisher = {
        let (a, to) = (Arc::clone(&a), to.clone());
        tokio::spawn(async move {
            let origin = node("node-a");
            for k in 1..=N {
                a.publish(&message(&origin, k, to.clone(), k.to_string()))
                    .await
                    .unwrap_or_else(|e| panic!("publish {k} failed: {e}"));
                if k % 10 == 0 {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
        })
    };
    for part in 1..=3 {
        b_in.wait_for(usize::try_from(N * part / 4).expect("fits"))
            .await;
        server
            .command(&["CLIENT", "KILL", "TYPE", "normal"])
            .await
            .expect("CLIENT KILL");
    }
    tokio::time::timeout(WAIT * 2, publisher)
        .await
        .expect("the publisher finishes")
        .expect("every publish succeeds");
    let marker = message(&node("node-a"), N + 1, to, (N + 1).to_string());
    a.publish(&marker).await.expect("publishes the marker");
    b_in.wait_for(usize::try_from(N + 1).expect("fits")).await;
    let got: Vec<u64> = b_in.all().iter().map(number).collect();
    let want: Vec<u64> = (1..=N + 1).collect();
    assert_eq!(got, want, "B got every message once, in order");
    a.stop().await;
    b.stop().await;
}

/// A node that vanishes without stopping is forgotten once its alive key expires: channel
/// publications stop counting it and its membership is removed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashed_members_are_forgotten() {
    let server = RedisServer::start();
    let names = namespace("c");
    let config = RedisConfig::new(server.url())
        .with_channel_names(names.clone())
        .with_alive_ttl(Duration::from_millis(300));
    let (a, _a_in) = started(config.clone(), "node-a").await;
    let (b, _b_in) = started(config, "node-b").await;
    let room = Address::Group(Arc::from("room"));
    b.subscribe(&room).await.expect("subscribes");
    let origin = node("node-a");
    let reach = a
        .publish(&message(&origin, 1, room.clone(), "while b runs"))
        .await
        .expect("publishes");
    assert_eq!(reach.nodes, Some(1));
    // Dropping the endpoint ends its tasks without deregistering, as a crash would.
    drop(b);
    let members = format!("{}:members", names.channel(&room));
    let mut seq = 2;
    tokio::time::timeout(WAIT, async {
        loop {
            let reach = a
                .publish(&message(&origin, seq, room.clone(), "after the crash"))
                .await
                .expect("publishes");
            if reach.nodes == Some(0) {
                return;
            }
            seq += 1;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the crashed node stops counting once its alive key expires");
    let left = server.command(&["SCARD", &members]).await.expect("SCARD");
    assert_eq!(left, redis::Value::Int(0), "the crashed member was removed");
    a.stop().await;
}
