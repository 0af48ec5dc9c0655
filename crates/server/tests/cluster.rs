//! Several hub services in one process over one shared store and the in-memory backplane
//! (`switchboard_core::testkit::MemoryBus`): delivery across nodes exactly once and in order,
//! users elsewhere reported forwarded rather than offline, groups and broadcasts on every
//! node, connections reached by id, crashed nodes fading out at lease expiry, and backplane
//! outages reported to the sender.

mod common;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::{FlakyStore, RawClient, TestServer, chat, eventually, messages, until_completion};
use serde_json::{Value, json};
use switchboard::hub::{Hub, HubContext, HubError};
use switchboard::{HubOptions, chat};
use switchboard_core::testkit::{MemoryBus, ReferenceStore, node, user};
use switchboard_core::{ConnectionId, ConnectionStore, NodeId};

/// A short lease, so that lapses and sweeps happen within a second.
fn options() -> HubOptions {
    HubOptions::default().with_lease(Duration::from_millis(600))
}

/// N nodes over one reference store and one memory bus.
struct Cluster {
    store: Arc<dyn ConnectionStore>,
    bus: MemoryBus,
    nodes: Vec<TestServer>,
}

impl Cluster {
    async fn start(n: usize) -> Self {
        Self::start_with(n, chat::hub).await
    }

    async fn start_with(n: usize, hub: fn() -> Hub) -> Self {
        let store: Arc<dyn ConnectionStore> =
            Arc::new(FlakyStore::shared(Arc::new(ReferenceStore::new())));
        let bus = MemoryBus::new();
        let mut nodes = Vec::new();
        for i in 1..=n {
            nodes.push(
                TestServer::start_node_with(
                    hub(),
                    node(&format!("n{i}")),
                    store.clone(),
                    Some(bus.endpoint()),
                    options(),
                )
                .await,
            );
        }
        Self { store, bus, nodes }
    }

    fn node(&self, i: usize) -> &TestServer {
        &self.nodes[i - 1]
    }

    fn delivered(&self, i: usize) -> u64 {
        self.bus.delivered(&node(&format!("n{i}")))
    }

    /// The ids of `name`'s connections recorded on node `i`.
    async fn ids_on(&self, name: &str, i: usize) -> Vec<ConnectionId> {
        let on: NodeId = node(&format!("n{i}"));
        self.store
            .connections(&user(name))
            .await
            .expect("lookup")
            .into_iter()
            .filter(|r| *r.node() == on)
            .map(|r| r.id().clone())
            .collect()
    }
}

async fn send_chat(client: &mut RawClient, id: &str, who: &str, text: &str) {
    let record = json!({"type": 1, "invocationId": id, "target": "SendChatMessage", "arguments": [who, text]});
    client.send_record(&record.to_string()).await;
}

#[tokio::test]
async fn a_user_on_two_nodes_gets_every_message_exactly_once_and_in_order() {
    let cluster = Cluster::start(3).await;
    let mut alice_laptop = cluster.node(1).connect("alice").await;
    let mut alice_phone = cluster.node(2).connect("alice").await;
    let mut bob = cluster.node(3).connect("bob").await;
    const N: usize = 50;
    for i in 0..N {
        send_chat(&mut bob, &i.to_string(), "alice", &format!("m{i}")).await;
    }
    // Each Completion comes without an error message before it.
    let mut completions = Vec::new();
    while completions.len() < N {
        let message = bob.next_message().await.expect("a Completion");
        assert_eq!(message["type"], 3, "bob got something else: {message}");
        completions.push(message);
    }
    let expected: Vec<Value> = (0..N).map(|i| chat(&format!("bob: m{i}"))).collect();
    assert_eq!(messages(&mut alice_laptop, N).await, expected);
    assert_eq!(messages(&mut alice_phone, N).await, expected);
    // Nothing more arrives: a marker is the very next message on both.
    send_chat(&mut bob, "marker", "alice", "marker").await;
    assert_eq!(messages(&mut alice_laptop, 1).await, [chat("bob: marker")]);
    assert_eq!(messages(&mut alice_phone, 1).await, [chat("bob: marker")]);
    // One backplane message per message and node holding alice; none for the sender's node.
    assert_eq!(cluster.delivered(1), N as u64 + 1);
    assert_eq!(cluster.delivered(2), N as u64 + 1);
    assert_eq!(cluster.delivered(3), 0, "bob's node holds no recipient");
}

#[tokio::test]
async fn a_user_only_on_another_node_is_forwarded_not_offline() {
    let cluster = Cluster::start(3).await;
    let mut bob = cluster.node(2).connect("bob").await;
    let mut bob_tablet = cluster.node(2).connect("bob").await;
    let mut alice = cluster.node(1).connect("alice").await;
    send_chat(&mut alice, "1", "bob", "hi").await;
    assert_eq!(
        until_completion(&mut alice, "1").await,
        [json!({"type": 3, "invocationId": "1", "result": null})],
        "no error message: bob is connected, elsewhere"
    );
    assert_eq!(messages(&mut bob, 1).await, [chat("alice: hi")]);
    assert_eq!(messages(&mut bob_tablet, 1).await, [chat("alice: hi")]);
    let delivery = cluster
        .node(1)
        .hub
        .user(&user("bob"))
        .send("addChatMessage", &("from outside",))
        .await
        .expect("delivery");
    assert_eq!(delivery.local, 0);
    assert_eq!(
        (delivery.forwarded.nodes, delivery.forwarded.connections),
        (1, 2),
        "one message to the one node holding both connections"
    );
    assert!(!delivery.nobody_there());
    assert_eq!(
        cluster.delivered(3),
        0,
        "a node holding none of the targets gets nothing"
    );
    // Someone connected nowhere is offline.
    send_chat(&mut alice, "2", "carol", "hi").await;
    assert_eq!(
        until_completion(&mut alice, "2").await[0],
        json!({"type": 1, "target": "showErrorMessage", "arguments": ["The user 'carol' is not connected."]})
    );
}

fn group_hub() -> Hub {
    chat::hub()
        .method(
            "JoinGroup",
            |ctx: HubContext, (name,): (String,)| async move {
                ctx.clients().join_group(&name).await?;
                Ok::<_, HubError>(())
            },
        )
        .method(
            "LeaveGroup",
            |ctx: HubContext, (name,): (String,)| async move {
                ctx.clients().leave_group(&name).await
            },
        )
}

#[tokio::test]
async fn groups_and_broadcasts_reach_every_node_once() {
    let cluster = Cluster::start_with(3, group_hub).await;
    let mut one = cluster.node(1).connect("ann").await;
    let mut two = cluster.node(2).connect("ben").await;
    let mut three = cluster.node(3).connect("cat").await;
    one.invoke("j", "JoinGroup", json!(["room"])).await;
    two.invoke("j", "JoinGroup", json!(["room"])).await;
    two.invoke("j2", "JoinGroup", json!(["room"])).await;
    let delivery = cluster
        .node(3)
        .hub
        .group("room")
        .send("addChatMessage", &("to the room",))
        .await
        .expect("delivery");
    assert!(delivery.published);
    assert_eq!(delivery.local, 0);
    assert_eq!(messages(&mut one, 1).await, [chat("to the room")]);
    assert_eq!(messages(&mut two, 1).await, [chat("to the room")]);
    assert_eq!(
        cluster.delivered(3),
        0,
        "node 3 holds no member: not subscribed"
    );

    // Everyone, on every node, exactly once (the sender's node included, in-process).
    let delivery = cluster
        .node(1)
        .hub
        .all()
        .send("addChatMessage", &("to all",))
        .await
        .expect("delivery");
    assert_eq!(delivery.local, 1);
    for client in [&mut one, &mut two, &mut three] {
        assert_eq!(messages(client, 1).await, [chat("to all")]);
    }

    // Ben leaves: node 2 unsubscribes, and only ann gets the next message.
    let left = two.invoke("l", "LeaveGroup", json!(["room"])).await;
    assert_eq!(left["result"], true);
    let before = cluster.delivered(2);
    let _ = cluster
        .node(3)
        .hub
        .group("room")
        .send("addChatMessage", &("again",))
        .await
        .expect("delivery");
    assert_eq!(messages(&mut one, 1).await, [chat("again")]);
    let _ = cluster
        .node(3)
        .hub
        .all()
        .send("addChatMessage", &("marker",))
        .await
        .expect("delivery");
    assert_eq!(
        messages(&mut two, 1).await,
        [chat("marker")],
        "ben got nothing else"
    );
    assert_eq!(
        cluster.delivered(2),
        before + 1,
        "node 2 got the broadcast only, not the room message"
    );
}

#[tokio::test]
async fn a_connection_on_another_node_is_reached_by_its_id() {
    let cluster = Cluster::start(2).await;
    let mut bob = cluster.node(2).connect("bob").await;
    let ids = cluster.ids_on("bob", 2).await;
    assert_eq!(ids.len(), 1);
    assert!(ids[0].as_str().starts_with("n2~"), "{}", ids[0]);
    let delivery = cluster
        .node(1)
        .hub
        .client(&ids[0])
        .send("addChatMessage", &("just you",))
        .await
        .expect("delivery");
    assert_eq!(
        (delivery.forwarded.nodes, delivery.forwarded.connections),
        (1, 1)
    );
    assert_eq!(messages(&mut bob, 1).await, [chat("just you")]);
    // An id naming no running node reaches nobody and costs no other node anything.
    let stray = ConnectionId::new("n9~AAAAAAAAAAAAAAAAAAAAAA").expect("valid");
    let _ = cluster
        .node(1)
        .hub
        .client(&stray)
        .send("addChatMessage", &("nobody",))
        .await
        .expect("delivery");
    assert_eq!(cluster.delivered(2), 1);
}

#[tokio::test]
async fn a_crashed_nodes_connections_stop_counting_when_its_lease_expires() {
    let shared: Arc<dyn ConnectionStore> =
        Arc::new(FlakyStore::shared(Arc::new(ReferenceStore::new())));
    let bus = MemoryBus::new();
    let view = Arc::new(FlakyStore::over(shared.clone()));
    let one =
        TestServer::start_node(node("n1"), shared.clone(), Some(bus.endpoint()), options()).await;
    let _two =
        TestServer::start_node(node("n2"), view.clone(), Some(bus.endpoint()), options()).await;
    let _bob = _two.connect("bob").await;
    let mut alice = one.connect("alice").await;
    send_chat(&mut alice, "1", "bob", "hi").await;
    assert_eq!(
        until_completion(&mut alice, "1").await.len(),
        1,
        "delivered, no error"
    );
    // Node 2 stops renewing (as a crashed node would). Within its lease, bob is gone from
    // lookups and node 1 reports him offline.
    view.down.store(true, Ordering::SeqCst);
    eventually("bob's record stops counting", || async {
        shared
            .connections(&user("bob"))
            .await
            .expect("lookup")
            .is_empty()
    })
    .await;
    send_chat(&mut alice, "2", "bob", "still there?").await;
    assert_eq!(
        until_completion(&mut alice, "2").await[0],
        json!({"type": 1, "target": "showErrorMessage", "arguments": ["The user 'bob' is not connected."]})
    );
}

#[tokio::test]
async fn a_backplane_outage_is_reported_to_the_sender_and_in_readiness() {
    let cluster = Cluster::start(2).await;
    let mut bob = cluster.node(2).connect("bob").await;
    let mut alice = cluster.node(1).connect("alice").await;
    let mut alice_phone = cluster.node(1).connect("alice").await;
    cluster.bus.set_down(true);
    send_chat(&mut bob, "1", "alice", "while down").await;
    assert_eq!(
        until_completion(&mut bob, "1").await[0],
        json!({"type": 1, "target": "showErrorMessage", "arguments": [
            "The message to 'alice' could not reach 2 connection(s) on other servers right now; try again later."
        ]})
    );
    assert!(!cluster.node(1).hub.readiness().is_ready());
    let (status, body) = cluster.node(1).http("GET", "/readyz", &[], "").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("backplane"), "{body}");
    // Local delivery never depends on the backplane.
    send_chat(&mut alice_phone, "2", "alice", "same node").await;
    assert_eq!(messages(&mut alice, 1).await, [chat("alice: same node")]);
    cluster.bus.set_down(false);
    assert!(cluster.node(1).hub.readiness().is_ready());
    send_chat(&mut bob, "3", "alice", "back").await;
    assert_eq!(messages(&mut alice, 1).await, [chat("bob: back")]);
}

#[tokio::test]
async fn without_lookup_users_travel_on_reference_counted_channels() {
    let store: Arc<dyn ConnectionStore> = Arc::new(common::NoLookupStore::default());
    let bus = MemoryBus::new();
    let mut nodes = Vec::new();
    for i in 1..=3 {
        nodes.push(
            TestServer::start_node(
                node(&format!("n{i}")),
                store.clone(),
                Some(bus.endpoint()),
                options(),
            )
            .await,
        );
    }
    let delivered = |i: usize| bus.delivered(&node(&format!("n{i}")));
    let mut alice_laptop = nodes[0].connect("alice").await;
    let alice_phone = nodes[1].connect("alice").await;
    let mut alice_phone = Some(alice_phone);
    let mut bob = nodes[2].connect("bob").await;
    const N: usize = 20;
    for i in 0..N {
        send_chat(&mut bob, &i.to_string(), "alice", &format!("m{i}")).await;
    }
    let expected: Vec<Value> = (0..N).map(|i| chat(&format!("bob: m{i}"))).collect();
    assert_eq!(messages(&mut alice_laptop, N).await, expected);
    if let Some(phone) = alice_phone.as_mut() {
        assert_eq!(messages(phone, N).await, expected);
    }
    for _ in 0..N {
        let message = bob.next_message().await.expect("a Completion");
        assert_eq!(
            message["type"], 3,
            "no error for a user reached on her channel: {message}"
        );
    }
    assert_eq!((delivered(1), delivered(2)), (N as u64, N as u64));
    assert_eq!(
        delivered(3),
        0,
        "bob's node holds no connection of alice: not subscribed"
    );

    // Alice's last connection on node 2 closes: node 2 leaves her channel.
    drop(alice_phone.take());
    nodes[2].wait_for_connections(2).await;
    let mut carol = nodes[1].connect("carol").await;
    let before = delivered(2);
    send_chat(&mut bob, "x", "alice", "after").await;
    assert_eq!(messages(&mut alice_laptop, 1).await, [chat("bob: after")]);
    let _ = nodes[2]
        .hub
        .all()
        .send("addChatMessage", &("marker",))
        .await
        .expect("delivery");
    // Node 2 delivers in the order node 3 published: once carol has the marker, anything
    // for alice would have arrived before it.
    assert_eq!(messages(&mut carol, 1).await, [chat("marker")]);
    assert_eq!(
        delivered(2),
        before + 1,
        "node 2 got the broadcast but not the message for alice"
    );
    // Nobody anywhere listens on dave's channel: the backplane says so, and bob is told.
    let _ = until_completion(&mut bob, "x").await;
    send_chat(&mut bob, "c", "dave", "hello?").await;
    let got = until_completion(&mut bob, "c").await;
    assert!(
        got.contains(&json!({"type": 1, "target": "showErrorMessage", "arguments": ["The user 'dave' is not connected."]})),
        "{got:?}"
    );
}

/// A memory bus endpoint that hands every message to its node twice, as a backplane that
/// retried a publish whose answer was lost would.
#[derive(Debug)]
struct Twice(Arc<dyn switchboard_core::Backplane>);

struct TwiceInbox(Arc<dyn switchboard_core::Inbox>);

#[switchboard_core::async_trait]
impl switchboard_core::Inbox for TwiceInbox {
    async fn receive(&self, message: switchboard_core::Message) {
        self.0.receive(message.clone()).await;
        self.0.receive(message).await;
    }
}

#[switchboard_core::async_trait]
impl switchboard_core::Backplane for Twice {
    fn capabilities(&self) -> switchboard_core::BackplaneCapabilities {
        self.0.capabilities()
    }
    async fn start(
        &self,
        node: &NodeId,
        inbox: Arc<dyn switchboard_core::Inbox>,
    ) -> Result<(), switchboard_core::BackplaneError> {
        self.0.start(node, Arc::new(TwiceInbox(inbox))).await
    }
    async fn publish(
        &self,
        message: &switchboard_core::Message,
    ) -> Result<switchboard_core::Reach, switchboard_core::BackplaneError> {
        self.0.publish(message).await
    }
    async fn subscribe(
        &self,
        address: &switchboard_core::Address,
    ) -> Result<(), switchboard_core::BackplaneError> {
        self.0.subscribe(address).await
    }
    async fn unsubscribe(
        &self,
        address: &switchboard_core::Address,
    ) -> Result<(), switchboard_core::BackplaneError> {
        self.0.unsubscribe(address).await
    }
    fn health(&self) -> switchboard_core::Health {
        self.0.health()
    }
    async fn stop(&self) {
        self.0.stop().await;
    }
}

#[tokio::test]
async fn a_message_handed_over_twice_is_delivered_once() {
    let store: Arc<dyn ConnectionStore> =
        Arc::new(FlakyStore::shared(Arc::new(ReferenceStore::new())));
    let bus = MemoryBus::new();
    let one = TestServer::start_node(
        node("n1"),
        store.clone(),
        Some(Arc::new(Twice(bus.endpoint()))),
        options(),
    )
    .await;
    let two = TestServer::start_node(
        node("n2"),
        store.clone(),
        Some(Arc::new(Twice(bus.endpoint()))),
        options(),
    )
    .await;
    let mut alice = one.connect("alice").await;
    let mut bob = two.connect("bob").await;
    for i in 0..20 {
        send_chat(&mut bob, &i.to_string(), "alice", &format!("m{i}")).await;
    }
    send_chat(&mut bob, "end", "alice", "marker").await;
    let mut expected: Vec<Value> = (0..20).map(|i| chat(&format!("bob: m{i}"))).collect();
    expected.push(chat("bob: marker"));
    assert_eq!(messages(&mut alice, 21).await, expected);
    // Nothing else follows: the repeats were dropped.
    let _ = one
        .hub
        .client(&cluster_ids(&*store, "alice").await[0])
        .send("addChatMessage", &("last",))
        .await
        .expect("delivery");
    assert_eq!(messages(&mut alice, 1).await, [chat("last")]);
}

async fn cluster_ids(store: &dyn ConnectionStore, name: &str) -> Vec<ConnectionId> {
    store
        .connections(&user(name))
        .await
        .expect("lookup")
        .into_iter()
        .map(|r| r.id().clone())
        .collect()
}

#[tokio::test]
async fn a_stateful_reconnect_replays_messages_from_other_nodes_exactly_once() {
    let store: Arc<dyn ConnectionStore> =
        Arc::new(FlakyStore::shared(Arc::new(ReferenceStore::new())));
    let bus = MemoryBus::new();
    let stateful = || options().with_stateful_reconnect(true, Duration::from_secs(10));
    let one =
        TestServer::start_node(node("n1"), store.clone(), Some(bus.endpoint()), stateful()).await;
    let two =
        TestServer::start_node(node("n2"), store.clone(), Some(bus.endpoint()), stateful()).await;
    let (token, mut alice) = common::connect_stateful(&one, "alice").await;
    let mut bob = two.connect("bob").await;
    for i in 0..5 {
        bob.invoke(
            &i.to_string(),
            "SendChatMessage",
            json!(["alice", format!("m{i}")]),
        )
        .await;
    }
    assert_eq!(
        messages(&mut alice, 2).await[..2],
        [chat("bob: m0"), chat("bob: m1")]
    );
    // The transport drops with nothing acknowledged; bob goes on sending from the other node.
    drop(alice);
    for i in 5..8 {
        bob.invoke(
            &i.to_string(),
            "SendChatMessage",
            json!(["alice", format!("m{i}")]),
        )
        .await;
    }
    let mut alice = common::attach(&one, "alice", &token).await;
    let mut replay = Vec::new();
    while replay.len() < 9 {
        replay.extend(alice.next_records().await.expect("replay"));
    }
    assert_eq!(replay[0], json!({"type": 9, "sequenceId": 1}));
    let expected: Vec<Value> = (0..8).map(|i| chat(&format!("bob: m{i}"))).collect();
    assert_eq!(replay[1..9], expected[..], "every message once, in order");
    bob.invoke("end", "SendChatMessage", json!(["alice", "after"]))
        .await;
    assert_eq!(messages(&mut alice, 1).await, [chat("bob: after")]);
}
