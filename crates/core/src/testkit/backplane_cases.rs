//! The backplane conformance cases, one function per behaviour.
//!
//! Every case takes a [`BackplaneHarness`], asks it for the endpoints of a few nodes under a
//! fresh namespace, starts each with a recording [`Inbox`], and panics (like `assert!`) when
//! the backplane misbehaves. Cases that depend on an optional ability first read the
//! backplane's [`BackplaneCapabilities`] and hold it to them: a backplane that claims an
//! ability must show it, and one that does not must answer [`BackplaneError::Unsupported`].
//!
//! Counting is driven by markers, never by sleeping alone: after its messages a case
//! publishes a marker to every node, waits until each node received its marker, then waits
//! until no node received anything for [`BackplaneHarness::quiet_period`]. Every wait and
//! every call is bounded ([`WAIT`]), so a backplane that loses messages or hangs fails the
//! case instead of hanging it.

use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::watch;
use tokio::time::{Instant, timeout, timeout_at};

use super::{BackplaneHarness, conn, node, unique_namespace, user};
use crate::backplane::Reach;
use crate::backplane::{
    Address, Backplane, BackplaneCapabilities, BackplaneError, Health, Inbox, Message, MessageId,
    Ordering,
};
use crate::id::{ConnectionId, NodeId};

/// The bound on every backplane call and every wait for a message.
pub const WAIT: Duration = Duration::from_secs(10);

/// The bound within which an unreachable backplane must fail.
pub const UNREACHABLE_BOUND: Duration = Duration::from_secs(15);

/// The largest payload a case allocates: a backplane claiming a larger
/// [`BackplaneCapabilities::max_payload`] is tested up to this size only.
pub const MAX_TESTED_PAYLOAD: usize = 64 * 1024 * 1024;

/// How marker payloads start; no case sends data that starts this way.
const MARKER: &[u8] = b"\0switchboard-conformance-marker:";

/// The group every node of a backplane without node addresses joins to receive markers.
const MARKER_GROUP: &str = "\0switchboard-conformance-markers";

fn is_marker(message: &Message) -> bool {
    message.payload.starts_with(MARKER)
}

/// Records what one node receives.
struct Recorder {
    node: NodeId,
    delay: Duration,
    messages: Mutex<Vec<Message>>,
    changes: watch::Sender<usize>,
}

#[async_trait]
impl Inbox for Recorder {
    async fn receive(&self, message: Message) {
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        let len = {
            let mut messages = self.messages.lock().unwrap_or_else(PoisonError::into_inner);
            messages.push(message);
            messages.len()
        };
        self.changes.send_replace(len);
    }
}

impl Recorder {
    fn new(node: NodeId, delay: Duration) -> Self {
        Self {
            node,
            delay,
            messages: Mutex::new(Vec::new()),
            changes: watch::channel(0).0,
        }
    }

    fn all(&self) -> Vec<Message> {
        self.messages
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// What the node received, markers left out, in arrival order.
    fn data(&self) -> Vec<Message> {
        self.all().into_iter().filter(|m| !is_marker(m)).collect()
    }

    /// Waits (at most [`WAIT`]) until `done` holds for the messages received so far.
    async fn wait_until(&self, what: &str, done: impl Fn(&[Message]) -> bool) {
        let mut changes = self.changes.subscribe();
        let deadline = Instant::now() + WAIT;
        loop {
            {
                let messages = self.messages.lock().unwrap_or_else(PoisonError::into_inner);
                if done(&messages) {
                    return;
                }
            }
            // The sender lives in `self`, so `changed` only ends on a change or the deadline.
            if timeout_at(deadline, changes.changed()).await.is_err() {
                let received = self.all();
                panic!(
                    "node {}: no {what} within {WAIT:?}; received {} messages: {:?}",
                    self.node,
                    received.len(),
                    received.iter().map(describe).collect::<Vec<_>>()
                );
            }
        }
    }

    /// Waits until nothing arrived for `period` (at most [`WAIT`] in all).
    async fn quiet(&self, period: Duration) {
        let deadline = Instant::now() + WAIT;
        loop {
            let mut changes = self.changes.subscribe();
            match timeout(period, changes.changed()).await {
                Err(_) => return,
                Ok(_) if Instant::now() >= deadline => panic!(
                    "node {}: messages kept arriving for {WAIT:?} ({} so far)",
                    self.node,
                    self.all().len()
                ),
                Ok(_) => {}
            }
        }
    }
}

/// A short description of a message for failure output (payloads can be large).
fn describe(message: &Message) -> String {
    let shown = message.payload.len().min(40);
    format!(
        "{}#{} to {} ({} connections, {} bytes: {:?}{})",
        message.id.origin,
        message.id.seq,
        message.to,
        message.connections.len(),
        message.payload.len(),
        String::from_utf8_lossy(&message.payload[..shown]),
        if shown < message.payload.len() {
            "…"
        } else {
            ""
        }
    )
}

/// Panics unless `got` equals `want` field by field, naming the first difference.
fn assert_same(context: &str, got: &Message, want: &Message) {
    assert_eq!(got.id, want.id, "{context}: message id");
    assert_eq!(got.to, want.to, "{context}: address of {}", describe(want));
    assert_eq!(
        got.connections,
        want.connections,
        "{context}: connections of {}",
        describe(want)
    );
    assert_eq!(
        got.payload.len(),
        want.payload.len(),
        "{context}: payload length of {}",
        describe(want)
    );
    if let Some(at) = got
        .payload
        .iter()
        .zip(want.payload.iter())
        .position(|(a, b)| a != b)
    {
        panic!(
            "{context}: payload of {} differs at byte {at}",
            describe(want)
        );
    }
}

/// Panics unless `got` holds exactly the messages of `want`, once each, in any order.
fn assert_same_set(context: &str, got: &[Message], want: &[Message]) {
    let sorted = |messages: &[Message]| {
        let mut v = messages.to_vec();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    };
    let (got, want) = (sorted(got), sorted(want));
    let ids = |messages: &[Message]| messages.iter().map(|m| m.id.clone()).collect::<Vec<_>>();
    assert_eq!(
        ids(&got),
        ids(&want),
        "{context}: got {:?}, expected {:?}",
        got.iter().map(describe).collect::<Vec<_>>(),
        want.iter().map(describe).collect::<Vec<_>>()
    );
    for (g, w) in got.iter().zip(&want) {
        assert_same(context, g, w);
    }
}

/// Runs `call` with the [`WAIT`] bound.
async fn bounded<T>(what: &str, call: impl Future<Output = T>) -> T {
    timeout(WAIT, call)
        .await
        .unwrap_or_else(|_| panic!("{what} did not return within {WAIT:?}"))
}

/// The started nodes of one case.
struct Cluster<'h> {
    harness: &'h dyn BackplaneHarness,
    planes: Vec<Arc<dyn Backplane>>,
    nodes: Vec<NodeId>,
    inboxes: Vec<Arc<Recorder>>,
    caps: BackplaneCapabilities,
    seqs: Vec<AtomicU64>,
    markers: AtomicU64,
}

async fn cluster(harness: &dyn BackplaneHarness, n: usize) -> Cluster<'_> {
    cluster_with_delay(harness, n, Duration::ZERO).await
}

/// `n` started nodes whose inboxes each take `delay` per message.
async fn cluster_with_delay(
    harness: &dyn BackplaneHarness,
    n: usize,
    delay: Duration,
) -> Cluster<'_> {
    let namespace = unique_namespace();
    let planes = bounded("the harness", harness.backplanes(&namespace, n)).await;
    assert_eq!(
        planes.len(),
        n,
        "the harness made the wrong number of backplanes"
    );
    let caps = planes[0].capabilities();
    assert!(
        caps.node_addressed || caps.channels,
        "a backplane must support node addresses, channels, or both"
    );
    assert!(caps.max_payload > 0, "max_payload must be positive");
    let mut nodes = Vec::with_capacity(n);
    let mut inboxes = Vec::with_capacity(n);
    for (i, plane) in planes.iter().enumerate() {
        assert_eq!(
            plane.capabilities(),
            caps,
            "endpoints of one backplane differ"
        );
        let id = node(&format!("{namespace}-n{i}"));
        let inbox = Arc::new(Recorder::new(id.clone(), delay));
        bounded("start", plane.start(&id, inbox.clone()))
            .await
            .unwrap_or_else(|e| panic!("start({id}) failed: {e}"));
        if !caps.node_addressed {
            bounded("subscribe", plane.subscribe(&marker_group()))
                .await
                .unwrap_or_else(|e| panic!("subscribe to the marker group failed: {e}"));
        }
        nodes.push(id);
        inboxes.push(inbox);
    }
    Cluster {
        harness,
        seqs: (0..n).map(|_| AtomicU64::new(1)).collect(),
        planes,
        nodes,
        inboxes,
        caps,
        markers: AtomicU64::new(0),
    }
}

fn marker_group() -> Address {
    Address::Group(Arc::from(MARKER_GROUP))
}

impl Cluster<'_> {
    /// A message from node `from`, with the next sequence number of that node.
    fn message(
        &self,
        from: usize,
        to: Address,
        connections: Vec<ConnectionId>,
        payload: impl Into<Bytes>,
    ) -> Message {
        Message::new(
            MessageId {
                origin: self.nodes[from].clone(),
                seq: self.seqs[from].fetch_add(1, AtomicOrdering::Relaxed),
            },
            to,
            connections,
            payload.into(),
        )
    }

    fn to_node(&self, i: usize) -> Address {
        Address::Node(self.nodes[i].clone())
    }

    async fn try_publish(&self, from: usize, message: &Message) -> Result<Reach, BackplaneError> {
        bounded("publish", self.planes[from].publish(message)).await
    }

    async fn publish(&self, from: usize, message: &Message) -> Reach {
        self.try_publish(from, message)
            .await
            .unwrap_or_else(|e| panic!("publish of {} failed: {e}", describe(message)))
    }

    /// Publishes a new message from `from` and returns it.
    async fn send(&self, from: usize, to: Address, payload: impl Into<Bytes>) -> Message {
        let message = self.message(from, to, Vec::new(), payload);
        let _reach = self.publish(from, &message).await;
        message
    }

    async fn subscribe(&self, i: usize, address: &Address) {
        bounded("subscribe", self.planes[i].subscribe(address))
            .await
            .unwrap_or_else(|e| panic!("node {i}: subscribe({address}) failed: {e}"));
    }

    async fn unsubscribe(&self, i: usize, address: &Address) {
        bounded("unsubscribe", self.planes[i].unsubscribe(address))
            .await
            .unwrap_or_else(|e| panic!("node {i}: unsubscribe({address}) failed: {e}"));
    }

    /// Sends a marker from `from` to each node of `among` and waits until each has it, then
    /// until all of them are quiet.
    async fn settle_among(&self, from: usize, among: &[usize]) {
        let k = self.markers.fetch_add(1, AtomicOrdering::Relaxed);
        let mut payload = MARKER.to_vec();
        payload.extend_from_slice(k.to_string().as_bytes());
        let payload = Bytes::from(payload);
        if self.caps.node_addressed {
            for &i in among {
                let marker = self.message(from, self.to_node(i), Vec::new(), payload.clone());
                self.publish(from, &marker).await;
            }
        } else {
            let marker = self.message(from, marker_group(), Vec::new(), payload.clone());
            self.publish(from, &marker).await;
        }
        for &i in among {
            self.inboxes[i]
                .wait_until("marker", |messages| {
                    messages.iter().any(|m| m.payload == payload)
                })
                .await;
        }
        for &i in among {
            self.inboxes[i].quiet(self.harness.quiet_period()).await;
        }
    }

    /// [`settle_among`](Self::settle_among) every node.
    async fn settle(&self, from: usize) {
        let all: Vec<usize> = (0..self.planes.len()).collect();
        self.settle_among(from, &all).await;
    }

    fn data(&self, i: usize) -> Vec<Message> {
        self.inboxes[i].data()
    }

    async fn stop(&self) {
        for plane in &self.planes {
            bounded("stop", plane.stop()).await;
        }
    }
}

/// A payload of `len` bytes that uses every byte value and has no repeating period of a
/// power of two, so a shifted or truncated copy never matches.
fn pattern(len: usize) -> Bytes {
    let mut state: u32 = 0x9e37_79b9;
    let mut out = Vec::with_capacity(len);
    for i in 0..len {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        out.push((state as u8) ^ (i as u8));
    }
    Bytes::from(out)
}

/// A started backplane reports [`Health::Up`] and sensible capabilities.
pub async fn started_backplanes_are_healthy(harness: &dyn BackplaneHarness) {
    let cluster = cluster(harness, 2).await;
    assert!(!cluster.caps.name.is_empty(), "capabilities need a name");
    for (i, plane) in cluster.planes.iter().enumerate() {
        let deadline = Instant::now() + WAIT;
        loop {
            match plane.health() {
                Health::Up => break,
                Health::Down(why) if Instant::now() >= deadline => {
                    panic!("node {i} is still down {WAIT:?} after start: {why}")
                }
                Health::Down(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    }
    cluster.stop().await;
}

/// A message to [`Address::Node`] reaches that node once, with its connection ids, and no
/// other node; a node can address itself.
pub async fn node_messages_reach_only_their_node(harness: &dyn BackplaneHarness) {
    let cluster = cluster(harness, 3).await;
    if !cluster.caps.node_addressed {
        return cluster.stop().await;
    }
    let to_b = cluster.message(
        0,
        cluster.to_node(1),
        vec![conn("c-1"), conn("c-2")],
        "from a to b",
    );
    cluster.publish(0, &to_b).await;
    let to_self = cluster.message(0, cluster.to_node(0), vec![conn("c-0")], "from a to a");
    cluster.publish(0, &to_self).await;
    let c_to_b = cluster.message(2, cluster.to_node(1), vec![conn("c-3")], "from c to b");
    cluster.publish(2, &c_to_b).await;
    cluster.settle(0).await;
    cluster.settle(2).await;
    assert_same_set("node a", &cluster.data(0), std::slice::from_ref(&to_self));
    assert_same_set("node b", &cluster.data(1), &[to_b, c_to_b]);
    assert_same_set("node c", &cluster.data(2), &[]);
    cluster.stop().await;
}

/// A channel message reaches every node subscribed to it once, the publisher included, and
/// no node that is not subscribed; a publisher need not be subscribed itself.
pub async fn channel_messages_reach_every_subscriber_once(harness: &dyn BackplaneHarness) {
    let cluster = cluster(harness, 3).await;
    if !cluster.caps.channels {
        return cluster.stop().await;
    }
    let channels = [
        Address::Group(Arc::from("room")),
        Address::User(user("alice")),
        Address::All,
    ];
    for channel in &channels {
        cluster.subscribe(0, channel).await;
        cluster.subscribe(1, channel).await;
    }
    let mut sent = Vec::new();
    for (k, channel) in channels.iter().enumerate() {
        sent.push(
            cluster
                .send(0, channel.clone(), format!("from a #{k}"))
                .await,
        );
    }
    sent.push(cluster.send(2, channels[0].clone(), "from c").await);
    cluster.settle(0).await;
    cluster.settle(2).await;
    assert_same_set("the publisher, subscribed", &cluster.data(0), &sent);
    assert_same_set("node b, subscribed", &cluster.data(1), &sent);
    assert_same_set("node c, not subscribed", &cluster.data(2), &[]);
    cluster.stop().await;
}

/// Subscribing twice delivers once, and one unsubscribe ends it; unsubscribing what is not
/// subscribed is harmless; a node can subscribe again.
pub async fn subscribe_and_unsubscribe_are_idempotent(harness: &dyn BackplaneHarness) {
    let cluster = cluster(harness, 2).await;
    if !cluster.caps.channels {
        return cluster.stop().await;
    }
    let room = Address::Group(Arc::from("room"));
    cluster.subscribe(1, &room).await;
    cluster.subscribe(1, &room).await;
    let first = cluster
        .send(0, room.clone(), "while subscribed twice")
        .await;
    cluster.settle(0).await;
    assert_same_set(
        "subscribed twice",
        &cluster.data(1),
        std::slice::from_ref(&first),
    );

    cluster.unsubscribe(1, &room).await;
    cluster.send(0, room.clone(), "after one unsubscribe").await;
    cluster.settle(0).await;
    assert_same_set(
        "after one unsubscribe",
        &cluster.data(1),
        std::slice::from_ref(&first),
    );

    cluster.unsubscribe(1, &room).await;
    cluster
        .unsubscribe(1, &Address::Group(Arc::from("never")))
        .await;
    cluster.subscribe(1, &room).await;
    let again = cluster.send(0, room.clone(), "subscribed again").await;
    cluster.settle(0).await;
    assert_same_set("subscribed again", &cluster.data(1), &[first, again]);
    cluster.stop().await;
}

/// With [`Ordering::PerSender`], 500 messages from one node to a node address and 500 to a
/// channel, interleaved, arrive in publish order per address; without it, each arrives once.
pub async fn messages_from_one_sender_arrive_in_order(harness: &dyn BackplaneHarness) {
    const N: usize = 500;
    let cluster = cluster(harness, 2).await;
    let feed = Address::Group(Arc::from("feed"));
    if cluster.caps.channels {
        cluster.subscribe(1, &feed).await;
    }
    let mut to_node = Vec::new();
    let mut to_channel = Vec::new();
    for k in 0..N {
        if cluster.caps.node_addressed {
            to_node.push(
                cluster
                    .send(0, cluster.to_node(1), format!("node {k}"))
                    .await,
            );
        }
        if cluster.caps.channels {
            to_channel.push(cluster.send(0, feed.clone(), format!("channel {k}")).await);
        }
    }
    cluster.settle(0).await;
    let got = cluster.data(1);
    let (got_node, got_channel): (Vec<Message>, Vec<Message>) = got
        .into_iter()
        .partition(|m| matches!(m.to, Address::Node(_)));
    if cluster.caps.ordering == Ordering::PerSender {
        let seqs = |messages: &[Message]| messages.iter().map(|m| m.id.seq).collect::<Vec<_>>();
        assert_eq!(
            seqs(&got_node),
            seqs(&to_node),
            "messages to the node address arrived out of order"
        );
        assert_eq!(
            seqs(&got_channel),
            seqs(&to_channel),
            "messages to the channel arrived out of order"
        );
    }
    assert_same_set("to the node address", &got_node, &to_node);
    assert_same_set("to the channel", &got_channel, &to_channel);
    cluster.stop().await;
}

/// Every field arrives byte for byte: hostile and unicode names, no connection ids or many,
/// an empty payload, every byte value, and a payload of exactly `max_payload` bytes.
pub async fn every_field_round_trips(harness: &dyn BackplaneHarness) {
    let cluster = cluster(harness, 2).await;
    let max = cluster.caps.max_payload.min(MAX_TESTED_PAYLOAD);
    let all_bytes: Bytes = (0..=255u8).collect::<Vec<u8>>().into();
    let mut sent = Vec::new();
    if cluster.caps.node_addressed {
        let many: Vec<ConnectionId> = (0..200)
            .map(|i| conn(&format!("c-{i}.x_~{}", "z".repeat(i % 50))))
            .collect();
        let cases: [(Vec<ConnectionId>, Bytes); 5] = [
            (Vec::new(), Bytes::new()),
            (vec![conn("c1")], all_bytes.clone()),
            (
                many,
                Bytes::from("{\"type\":1,\"target\":\"m\",\"arguments\":[\"Åsa 🚀\"]}\u{1e}"),
            ),
            (vec![conn(&"x".repeat(ConnectionId::MAX_LEN))], pattern(max)),
            (
                vec![conn("~"), conn("a.b-c_d")],
                Bytes::from_static(b"\0\r\n"),
            ),
        ];
        for (connections, payload) in cases {
            let message = cluster.message(0, cluster.to_node(1), connections, payload);
            cluster.publish(0, &message).await;
            sent.push(message);
        }
    }
    if cluster.caps.channels {
        let channels = [
            Address::User(user("Åsa 名前 🚀")),
            Address::User(user("*")),
            Address::User(user("a:b")),
            Address::User(user("{x}")),
            Address::User(user("user:bob")),
            Address::User(user(&"u".repeat(crate::UserId::MAX_LEN))),
            Address::Group(Arc::from("a:b")),
            Address::Group(Arc::from("")),
            Address::Group(Arc::from(" padded group ")),
            Address::All,
        ];
        for channel in &channels {
            cluster.subscribe(1, channel).await;
        }
        for (k, channel) in channels.iter().enumerate() {
            let payload = match k {
                0 => Bytes::new(),
                1 => pattern(max),
                2 => all_bytes.clone(),
                _ => Bytes::from(format!("to {channel}")),
            };
            sent.push(cluster.send(0, channel.clone(), payload).await);
        }
    }
    cluster.settle(0).await;
    assert_same_set("the receiver", &cluster.data(1), &sent);
    cluster.stop().await;
}

/// A payload of `max_payload + 1` bytes fails with [`BackplaneError::TooLarge`] (permanent),
/// to a node and to a channel, and nothing is delivered.
pub async fn payloads_over_the_limit_are_too_large(harness: &dyn BackplaneHarness) {
    let cluster = cluster(harness, 2).await;
    let max = cluster.caps.max_payload;
    if max >= MAX_TESTED_PAYLOAD {
        return cluster.stop().await;
    }
    let room = Address::Group(Arc::from("room"));
    let mut addresses = Vec::new();
    if cluster.caps.node_addressed {
        addresses.push(cluster.to_node(1));
    }
    if cluster.caps.channels {
        cluster.subscribe(1, &room).await;
        addresses.push(room);
    }
    let payload = pattern(max + 1);
    for to in addresses {
        let message = cluster.message(0, to.clone(), Vec::new(), payload.clone());
        match cluster.try_publish(0, &message).await {
            // The variant, not a `Backend` error: `TooLarge` is permanent by definition, so a
            // server never retries it.
            Err(BackplaneError::TooLarge { size, max: limit }) => {
                assert_eq!((size, limit), (max + 1, max), "TooLarge to {to}");
            }
            other => panic!(
                "publishing {} bytes to {to} should be TooLarge, got {other:?}",
                max + 1
            ),
        }
    }
    cluster.settle(0).await;
    assert_same_set("the receiver", &cluster.data(1), &[]);
    cluster.stop().await;
}

/// Names that look like patterns, separators or other addresses reach only their own
/// subscribers: user `user:bob`, group `bob`, user `bob`, user `*`, group `*`, …
pub async fn hostile_names_do_not_cross_talk(harness: &dyn BackplaneHarness) {
    let addresses = [
        Address::User(user("user:bob")),
        Address::Group(Arc::from("bob")),
        Address::User(user("bob")),
        Address::User(user("*")),
        Address::Group(Arc::from("*")),
        Address::Group(Arc::from("user:bob")),
        Address::User(user("b?b")),
        Address::Group(Arc::from("[bB]ob")),
        Address::User(user("{bob}")),
    ];
    let cluster = cluster(harness, addresses.len() + 1).await;
    if !cluster.caps.channels {
        return cluster.stop().await;
    }
    for (i, address) in addresses.iter().enumerate() {
        cluster.subscribe(i + 1, address).await;
    }
    let mut sent = Vec::new();
    for address in &addresses {
        sent.push(
            cluster
                .send(0, address.clone(), format!("to {address}"))
                .await,
        );
    }
    cluster.settle(0).await;
    assert_same_set(
        "the publisher, subscribed to nothing",
        &cluster.data(0),
        &[],
    );
    for (i, (address, message)) in addresses.iter().zip(&sent).enumerate() {
        assert_same_set(
            &format!("the subscriber of {address}"),
            &cluster.data(i + 1),
            std::slice::from_ref(message),
        );
    }
    cluster.stop().await;
}

/// Subscribing to a node address is [`BackplaneError::Unsupported`]; so is publishing to an
/// address kind the capabilities exclude, and subscribing without channels.
pub async fn unsupported_addresses_match_capabilities(harness: &dyn BackplaneHarness) {
    let cluster = cluster(harness, 2).await;
    let expect_unsupported = |what: &str, result: Result<(), BackplaneError>| match result {
        Err(e @ BackplaneError::Unsupported { .. }) => assert!(!e.is_transient()),
        other => panic!("{what} should be Unsupported, got {other:?}"),
    };
    let target = cluster.to_node(1);
    expect_unsupported(
        "subscribing to a node address",
        bounded("subscribe", cluster.planes[0].subscribe(&target)).await,
    );
    if !cluster.caps.node_addressed {
        let message = cluster.message(0, target.clone(), Vec::new(), "x");
        expect_unsupported(
            "publishing to a node without node_addressed",
            cluster.try_publish(0, &message).await.map(|_| ()),
        );
    }
    let room = Address::Group(Arc::from("room"));
    if cluster.caps.channels {
        cluster.subscribe(0, &room).await;
        cluster.unsubscribe(0, &room).await;
    } else {
        expect_unsupported(
            "subscribing without channels",
            bounded("subscribe", cluster.planes[0].subscribe(&room)).await,
        );
        for to in [room, Address::User(user("bob")), Address::All] {
            let message = cluster.message(0, to, Vec::new(), "x");
            expect_unsupported(
                "publishing to a channel without channels",
                cluster.try_publish(0, &message).await.map(|_| ()),
            );
        }
    }
    cluster.stop().await;
}

/// An endpoint whose broker cannot be reached fails start, publish and subscribe with a
/// transient error within [`UNREACHABLE_BOUND`] and does not report [`Health::Up`].
pub async fn an_unreachable_backplane_fails_transiently(harness: &dyn BackplaneHarness) {
    let Some(plane) = harness.unreachable().await else {
        return;
    };
    let caps = plane.capabilities();
    let me = node(&format!("{}-lost", unique_namespace()));
    fn expect_transient<T>(what: &str, result: Result<T, BackplaneError>) {
        match result {
            Err(e) => assert!(e.is_transient(), "{what} failed, but not transiently: {e}"),
            Ok(_) => panic!("{what} succeeded on an unreachable backplane"),
        }
    }
    let inbox = Arc::new(Recorder::new(me.clone(), Duration::ZERO));
    let started = within("start", plane.start(&me, inbox)).await;
    match started {
        Err(e) => assert!(e.is_transient(), "start failed, but not transiently: {e}"),
        Ok(()) => {
            assert_ne!(
                plane.health(),
                Health::Up,
                "an unreachable backplane reports Up"
            );
            let to = if caps.node_addressed {
                Address::Node(me.clone())
            } else {
                Address::All
            };
            let message = Message::new(
                MessageId {
                    origin: me.clone(),
                    seq: 1,
                },
                to,
                Vec::new(),
                Bytes::from_static(b"lost"),
            );
            let published = within("publish", plane.publish(&message)).await;
            expect_transient("publish", published);
            if caps.channels {
                let subscribed = within("subscribe", plane.subscribe(&Address::All)).await;
                expect_transient("subscribe", subscribed);
            }
        }
    }
    within("stop", plane.stop()).await;
}

/// Runs `call` with the [`UNREACHABLE_BOUND`].
async fn within<T>(what: &str, call: impl Future<Output = T>) -> T {
    timeout(UNREACHABLE_BOUND, call).await.unwrap_or_else(|_| {
        panic!("{what} on an unreachable backplane took more than {UNREACHABLE_BOUND:?}")
    })
}

/// A backplane that claims [`BackplaneCapabilities::reach`] says how many nodes each message
/// was handed to: every subscriber of a channel, none for a channel nobody subscribes to, one
/// for a running node. One that does not claim it answers `None`.
pub async fn publish_reports_its_reach_as_claimed(harness: &dyn BackplaneHarness) {
    let cluster = cluster(harness, 3).await;
    let room = Address::Group(Arc::from("reach-room"));
    let empty = Address::Group(Arc::from("reach-empty"));
    let mut expected: Vec<(Message, u64)> = Vec::new();
    if cluster.caps.channels {
        cluster.subscribe(1, &room).await;
        cluster.subscribe(2, &room).await;
        expected.push((cluster.message(0, room.clone(), Vec::new(), "to two"), 2));
        expected.push((cluster.message(0, empty.clone(), Vec::new(), "to none"), 0));
    }
    if cluster.caps.node_addressed {
        expected.push((
            cluster.message(0, cluster.to_node(1), Vec::new(), "to one"),
            1,
        ));
    }
    for (message, nodes) in &expected {
        let reach = cluster.publish(0, message).await;
        if cluster.caps.reach {
            assert_eq!(
                reach.nodes,
                Some(*nodes),
                "the reach of {} (capabilities claim reach)",
                describe(message)
            );
        } else {
            assert_eq!(
                reach.nodes, None,
                "reach claimed unknown, yet a count came back"
            );
        }
    }
    if cluster.caps.channels {
        cluster.unsubscribe(2, &room).await;
        let message = cluster.message(0, room.clone(), Vec::new(), "to one left");
        let reach = cluster.publish(0, &message).await;
        if cluster.caps.reach {
            assert_eq!(reach.nodes, Some(1), "after one subscriber left");
        }
    }
    cluster.stop().await;
}

/// Once [`Backplane::stop`] returns, nothing more reaches that node's inbox, even with
/// messages in flight and more published after; `stop` is idempotent, and the other nodes
/// keep working.
pub async fn nothing_arrives_after_stop(harness: &dyn BackplaneHarness) {
    let cluster = cluster_with_delay(harness, 2, Duration::from_millis(1)).await;
    let feed = Address::Group(Arc::from("feed"));
    if cluster.caps.channels {
        cluster.subscribe(1, &feed).await;
    }
    let to = if cluster.caps.node_addressed {
        cluster.to_node(1)
    } else {
        feed.clone()
    };
    for k in 0..300 {
        cluster
            .send(0, to.clone(), format!("before stop {k}"))
            .await;
    }
    cluster.inboxes[1]
        .wait_until("first message", |messages| !messages.is_empty())
        .await;
    bounded("stop", cluster.planes[1].stop()).await;
    let at_stop = cluster.inboxes[1].all().len();
    for k in 0..50 {
        let message = cluster.message(0, to.clone(), Vec::new(), format!("after stop {k}"));
        // A backplane may refuse to address a stopped node or drop the message; either way
        // the call must return.
        let _ = cluster.try_publish(0, &message).await;
    }
    cluster.settle_among(0, &[0]).await;
    cluster.inboxes[1].quiet(harness.quiet_period()).await;
    assert_eq!(
        cluster.inboxes[1].all().len(),
        at_stop,
        "messages reached the inbox after stop returned"
    );
    bounded("a second stop", cluster.planes[1].stop()).await;
    let still = cluster
        .send(0, cluster.to_node_or(0, &marker_group()), "still working")
        .await;
    cluster.inboxes[0]
        .wait_until("message after the other node stopped", |messages| {
            messages.iter().any(|m| m.id == still.id)
        })
        .await;
    cluster.stop().await;
}

impl Cluster<'_> {
    /// Node `i`'s address, or `channel` without node addresses.
    fn to_node_or(&self, i: usize, channel: &Address) -> Address {
        if self.caps.node_addressed {
            self.to_node(i)
        } else {
            channel.clone()
        }
    }
}
