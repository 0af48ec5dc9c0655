//! Several hub services in one process over a real Redis (`redis-server`, started by the test
//! on a free loopback port without persistence): the group-per-user strategy across nodes,
//! a shared store routed by node, and a Redis restart in the middle of a stream of messages.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{FlakyStore, RawClient, TestServer, chat, messages, until_completion};
use serde_json::{Value, json};
use switchboard::HubOptions;
use switchboard_core::testkit::{ReferenceStore, node, user};
use switchboard_core::{Backplane, ConnectionStore};
use switchboard_groups::GroupStore;
use switchboard_redis::testing::RedisServer;
use switchboard_redis::{RedisBackplane, RedisConfig};

/// A short node lease; the backplane's presence follows it.
fn options() -> HubOptions {
    HubOptions::default().with_lease(Duration::from_millis(900))
}

fn backplane(redis: &RedisServer) -> Arc<dyn Backplane> {
    let config = RedisConfig::new(redis.url()).with_alive_ttl(Duration::from_millis(900));
    Arc::new(RedisBackplane::new(config).expect("a valid configuration"))
}

/// `n` nodes, each with its own groups store (the groups of a node are its own), over Redis.
async fn groups_cluster(redis: &RedisServer, n: usize) -> Vec<TestServer> {
    let mut nodes = Vec::new();
    for i in 1..=n {
        nodes.push(
            TestServer::start_node(
                node(&format!("g{i}")),
                Arc::new(GroupStore::new()),
                Some(backplane(redis)),
                options(),
            )
            .await,
        );
    }
    nodes
}

async fn send_chat(client: &mut RawClient, id: &str, who: &str, text: &str) {
    let record = json!({"type": 1, "invocationId": id, "target": "SendChatMessage", "arguments": [who, text]});
    client.send_record(&record.to_string()).await;
}

/// Waits for every node's backplane link (the first connect happens in the background).
async fn wait_ready(nodes: &[TestServer]) {
    for server in nodes {
        common::eventually("the node is ready", || async {
            server.hub.readiness().is_ready()
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_groups_a_user_on_two_nodes_gets_every_message_exactly_once_and_in_order() {
    let redis = RedisServer::start();
    let nodes = groups_cluster(&redis, 3).await;
    wait_ready(&nodes).await;
    let mut laptop = nodes[0].connect("alice").await;
    let mut phone = nodes[1].connect("alice").await;
    let mut bob = nodes[2].connect("bob").await;
    const N: usize = 40;
    for i in 0..N {
        send_chat(&mut bob, &i.to_string(), "alice", &format!("m{i}")).await;
    }
    for _ in 0..N {
        let message = bob.next_message().await.expect("a Completion");
        assert_eq!(message["type"], 3, "bob was told something: {message}");
    }
    let expected: Vec<Value> = (0..N).map(|i| chat(&format!("bob: m{i}"))).collect();
    assert_eq!(messages(&mut laptop, N).await, expected);
    assert_eq!(messages(&mut phone, N).await, expected);
    send_chat(&mut bob, "m", "alice", "marker").await;
    assert_eq!(messages(&mut laptop, 1).await, [chat("bob: marker")]);
    assert_eq!(messages(&mut phone, 1).await, [chat("bob: marker")]);
    // Nobody anywhere holds carol: Redis counts no node on her channel.
    let _ = until_completion(&mut bob, "m").await;
    send_chat(&mut bob, "c", "carol", "hi").await;
    let got = until_completion(&mut bob, "c").await;
    assert_eq!(
        got[0],
        json!({"type": 1, "target": "showErrorMessage", "arguments": ["The user 'carol' is not connected."]})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_store_routes_by_node_over_redis() {
    let redis = RedisServer::start();
    let store: Arc<dyn ConnectionStore> =
        Arc::new(FlakyStore::shared(Arc::new(ReferenceStore::new())));
    let mut nodes = Vec::new();
    for i in 1..=3 {
        nodes.push(
            TestServer::start_node(
                node(&format!("s{i}")),
                store.clone(),
                Some(backplane(&redis)),
                options(),
            )
            .await,
        );
    }
    wait_ready(&nodes).await;
    let mut bob = nodes[1].connect("bob").await;
    let mut alice = nodes[0].connect("alice").await;
    send_chat(&mut alice, "1", "bob", "hi").await;
    assert_eq!(
        until_completion(&mut alice, "1").await,
        [json!({"type": 3, "invocationId": "1", "result": null})]
    );
    assert_eq!(messages(&mut bob, 1).await, [chat("alice: hi")]);
    let delivery = nodes[2]
        .hub
        .user(&user("bob"))
        .send("addChatMessage", &("from node 3",))
        .await
        .expect("delivery");
    assert_eq!(
        (delivery.forwarded.nodes, delivery.forwarded.connections),
        (1, 1)
    );
    assert_eq!(messages(&mut bob, 1).await, [chat("from node 3")]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restart_loses_nothing_and_needs_no_node_restart() {
    let redis = RedisServer::start();
    let nodes = groups_cluster(&redis, 2).await;
    wait_ready(&nodes).await;
    let mut alice = nodes[0].connect("alice").await;
    let mut bob = nodes[1].connect("bob").await;
    const N: usize = 120;
    let sender = tokio::spawn(async move {
        for i in 0..N {
            send_chat(&mut bob, &i.to_string(), "alice", &format!("m{i}")).await;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let mut errors = Vec::new();
        let mut completions = 0;
        while completions < N {
            let message = bob.next_message().await.expect("a message");
            match message["type"].as_u64() {
                Some(3) => completions += 1,
                _ => errors.push(message),
            }
        }
        errors
    });
    // Restart Redis (empty, like one without persistence) while the messages flow.
    tokio::time::sleep(Duration::from_millis(300)).await;
    redis.restart();
    let expected: Vec<Value> = (0..N).map(|i| chat(&format!("bob: m{i}"))).collect();
    let errors = sender.await.expect("the sender finishes");
    let mut got = Vec::new();
    while got.len() < N {
        // Bounded: a message still missing after 15 s of silence is lost.
        match tokio::time::timeout(Duration::from_secs(15), alice.next_message()).await {
            Ok(Some(message)) => got.push(message),
            _ => break,
        }
    }
    assert!(errors.is_empty(), "bob was told of failures: {errors:?}");
    assert_eq!(
        got, expected,
        "every message once, in order, across the restart"
    );
}
