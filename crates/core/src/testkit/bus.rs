//! [`MemoryBus`]: an in-memory backplane connecting any number of nodes in one process.
//!
//! A bus is the broker; [`MemoryBus::endpoint`] hands out one [`Backplane`] per node, and
//! [`Backplane::start`] registers that node on the bus. Every started endpoint has an
//! unbounded queue and one task that hands the queued messages to its [`Inbox`] one at a time,
//! in order. Messages travel as their wire encoding ([`Message::encode`], then
//! [`Message::decode`] on the receiving side), so the codec is exercised and a receiver never
//! shares anything with the sender but immutable payload bytes.
//!
//! Delivery is at most once: a message to a node that is not running is dropped. A channel
//! message reaches every endpoint subscribed when it is published, once, the publisher
//! included. [`MemoryBus::set_down`] simulates a broker outage, and
//! [`MemoryBus::delivered`] and [`MemoryBus::published`] count what happened.
//!
//! ```ignore
//! let bus = MemoryBus::new();
//! let a = bus.endpoint();
//! a.start(&node("a"), inbox).await?;
//! ```

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering as AtomicOrdering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::backplane::{
    Address, Backplane, BackplaneCapabilities, BackplaneError, DeliveryClass, Health, Inbox,
    Message, Ordering, Reach,
};
use crate::id::NodeId;

/// An in-memory broker shared by the endpoints it hands out. Cloning is cheap: clones share
/// the same nodes, subscriptions and counters.
#[derive(Clone)]
pub struct MemoryBus {
    shared: Arc<Shared>,
}

struct Shared {
    max_payload: usize,
    down: AtomicBool,
    published: AtomicU64,
    next_endpoint: AtomicU64,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// The running nodes.
    nodes: HashMap<NodeId, Registration>,
    /// Messages handed to each node's inbox, kept after the node stops.
    delivered: HashMap<NodeId, Arc<AtomicU64>>,
}

/// A running node: how to reach it and what it listens to.
struct Registration {
    endpoint: u64,
    queue: mpsc::UnboundedSender<Bytes>,
    subscriptions: HashSet<Address>,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        // The state stays consistent whatever panicked while holding the lock: every update
        // is a single insert or remove.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn check_up(&self, operation: &str) -> Result<(), BackplaneError> {
        if self.down.load(AtomicOrdering::SeqCst) {
            return Err(BackplaneError::Unavailable {
                message: format!("the memory bus is down ({operation})"),
                source: None,
            });
        }
        Ok(())
    }
}

impl Default for MemoryBus {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for MemoryBus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.shared.state();
        let mut nodes: Vec<&NodeId> = state.nodes.keys().collect();
        nodes.sort();
        f.debug_struct("MemoryBus")
            .field("nodes", &nodes)
            .field("max_payload", &self.shared.max_payload)
            .field("down", &self.shared.down.load(AtomicOrdering::SeqCst))
            .finish()
    }
}

impl MemoryBus {
    /// The payload limit of [`MemoryBus::new`]: 1 MiB.
    pub const DEFAULT_MAX_PAYLOAD: usize = 1024 * 1024;

    /// A bus with no nodes, carrying payloads up to [`MemoryBus::DEFAULT_MAX_PAYLOAD`].
    pub fn new() -> Self {
        Self::with_max_payload(Self::DEFAULT_MAX_PAYLOAD)
    }

    /// A bus carrying payloads up to `max_payload` bytes; larger ones fail with
    /// [`BackplaneError::TooLarge`].
    pub fn with_max_payload(max_payload: usize) -> Self {
        Self {
            shared: Arc::new(Shared {
                max_payload,
                down: AtomicBool::new(false),
                published: AtomicU64::new(0),
                next_endpoint: AtomicU64::new(0),
                state: Mutex::new(State::default()),
            }),
        }
    }

    /// A fresh endpoint for one node on this bus. It joins the bus when
    /// [`start`](Backplane::start)ed.
    pub fn endpoint(&self) -> Arc<dyn Backplane> {
        Arc::new(MemoryEndpoint {
            shared: Arc::clone(&self.shared),
            id: self
                .shared
                .next_endpoint
                .fetch_add(1, AtomicOrdering::Relaxed),
            phase: Mutex::new(Phase::New),
        })
    }

    /// Simulates a broker outage (`true`) or its end (`false`). While down, `publish`,
    /// `subscribe` and `unsubscribe` fail with [`BackplaneError::Unavailable`] and `health`
    /// is [`Health::Down`]; messages already queued are still delivered.
    pub fn set_down(&self, down: bool) {
        self.shared.down.store(down, AtomicOrdering::SeqCst);
    }

    /// How many messages were handed to the inbox of `node`, over all its starts.
    pub fn delivered(&self, node: &NodeId) -> u64 {
        self.shared
            .state()
            .delivered
            .get(node)
            .map_or(0, |count| count.load(AtomicOrdering::SeqCst))
    }

    /// How many messages were accepted by `publish` on any endpoint of this bus (whether or
    /// not anyone received them).
    pub fn published(&self) -> u64 {
        self.shared.published.load(AtomicOrdering::SeqCst)
    }
}

/// Where an endpoint is in its life.
enum Phase {
    New,
    Running(Running),
    Stopped,
}

struct Running {
    node: NodeId,
    stopping: Arc<AtomicBool>,
    task: JoinHandle<()>,
}

/// One node's view of a [`MemoryBus`].
struct MemoryEndpoint {
    shared: Arc<Shared>,
    id: u64,
    phase: Mutex<Phase>,
}

impl fmt::Debug for MemoryEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let node = match &*self.phase() {
            Phase::New => "not started".to_owned(),
            Phase::Running(running) => running.node.to_string(),
            Phase::Stopped => "stopped".to_owned(),
        };
        f.debug_struct("MemoryEndpoint")
            .field("id", &self.id)
            .field("node", &node)
            .finish()
    }
}

fn not_running(operation: &str) -> BackplaneError {
    BackplaneError::Backend {
        message: format!("{operation} on a memory bus endpoint that is not running"),
        transient: false,
        source: None,
    }
}

impl MemoryEndpoint {
    fn phase(&self) -> MutexGuard<'_, Phase> {
        self.phase.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The node this endpoint runs as.
    fn node(&self, operation: &str) -> Result<NodeId, BackplaneError> {
        match &*self.phase() {
            Phase::Running(running) => Ok(running.node.clone()),
            Phase::New | Phase::Stopped => Err(not_running(operation)),
        }
    }

    /// Changes this node's subscriptions.
    fn subscription(&self, address: &Address, subscribe: bool) -> Result<(), BackplaneError> {
        let operation = if subscribe {
            "subscribe"
        } else {
            "unsubscribe"
        };
        if let Address::Node(_) = address {
            return Err(BackplaneError::unsupported(
                "memory",
                "subscribing to a node address",
            ));
        }
        self.shared.check_up(operation)?;
        let node = self.node(operation)?;
        let mut state = self.shared.state();
        let registration = state
            .nodes
            .get_mut(&node)
            .filter(|r| r.endpoint == self.id)
            .ok_or_else(|| not_running(operation))?;
        if subscribe {
            registration.subscriptions.insert(address.clone());
        } else {
            registration.subscriptions.remove(address);
        }
        Ok(())
    }

    /// Takes this endpoint off the bus; returns the task to wait for, if it was running.
    fn leave(&self) -> Option<(Arc<AtomicBool>, JoinHandle<()>)> {
        let running = match std::mem::replace(&mut *self.phase(), Phase::Stopped) {
            Phase::Running(running) => running,
            Phase::New | Phase::Stopped => return None,
        };
        running.stopping.store(true, AtomicOrdering::SeqCst);
        let mut state = self.shared.state();
        if state
            .nodes
            .get(&running.node)
            .is_some_and(|r| r.endpoint == self.id)
        {
            // Dropping the queue's sender ends the task once it has seen the flag.
            state.nodes.remove(&running.node);
        }
        Some((running.stopping, running.task))
    }
}

impl Drop for MemoryEndpoint {
    fn drop(&mut self) {
        if let Some((_, task)) = self.leave() {
            task.abort();
        }
    }
}

/// Hands the queued messages to `inbox`, one at a time, until the endpoint stops.
async fn deliver(
    mut queue: mpsc::UnboundedReceiver<Bytes>,
    inbox: Arc<dyn Inbox>,
    stopping: Arc<AtomicBool>,
    delivered: Arc<AtomicU64>,
) {
    while let Some(bytes) = queue.recv().await {
        if stopping.load(AtomicOrdering::SeqCst) {
            return;
        }
        // Only this bus writes to the queue, with `Message::encode`; a message that does not
        // decode would be a codec bug, and is dropped like any lost message.
        let Ok(message) = Message::decode(bytes) else {
            continue;
        };
        delivered.fetch_add(1, AtomicOrdering::SeqCst);
        inbox.receive(message).await;
    }
}

#[async_trait]
impl Backplane for MemoryEndpoint {
    fn capabilities(&self) -> BackplaneCapabilities {
        BackplaneCapabilities {
            name: "memory",
            delivery: DeliveryClass::AtMostOnce,
            ordering: Ordering::PerSender,
            max_payload: self.shared.max_payload,
            node_addressed: true,
            channels: true,
            reach: true,
        }
    }

    async fn start(&self, node: &NodeId, inbox: Arc<dyn Inbox>) -> Result<(), BackplaneError> {
        let mut phase = self.phase();
        if !matches!(*phase, Phase::New) {
            return Err(BackplaneError::Backend {
                message: format!(
                    "this memory bus endpoint was already started; cannot start it as {node}"
                ),
                transient: false,
                source: None,
            });
        }
        let mut state = self.shared.state();
        if state.nodes.contains_key(node) {
            return Err(BackplaneError::Backend {
                message: format!("node {node} is already running on this memory bus"),
                transient: false,
                source: None,
            });
        }
        let (queue, receiver) = mpsc::unbounded_channel();
        let delivered = Arc::clone(state.delivered.entry(node.clone()).or_default());
        let stopping = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn(deliver(receiver, inbox, Arc::clone(&stopping), delivered));
        state.nodes.insert(
            node.clone(),
            Registration {
                endpoint: self.id,
                queue,
                subscriptions: HashSet::new(),
            },
        );
        *phase = Phase::Running(Running {
            node: node.clone(),
            stopping,
            task,
        });
        Ok(())
    }

    async fn publish(&self, message: &Message) -> Result<Reach, BackplaneError> {
        self.shared.check_up("publish")?;
        self.node("publish")?;
        let max = self.shared.max_payload;
        if message.payload.len() > max {
            return Err(BackplaneError::TooLarge {
                size: message.payload.len(),
                max,
            });
        }
        let encoded = message.encode();
        let state = self.shared.state();
        // Sending under the lock puts every queue in the same publish order.
        let mut reached = 0;
        match &message.to {
            Address::Node(target) => {
                if let Some(registration) = state.nodes.get(target) {
                    // A closed queue is a node stopping: the message is lost, as promised.
                    let _ = registration.queue.send(encoded);
                    reached = 1;
                }
            }
            channel => {
                for registration in state.nodes.values() {
                    if registration.subscriptions.contains(channel) {
                        let _ = registration.queue.send(encoded.clone());
                        reached += 1;
                    }
                }
            }
        }
        self.shared.published.fetch_add(1, AtomicOrdering::SeqCst);
        Ok(Reach::nodes(reached))
    }

    async fn subscribe(&self, address: &Address) -> Result<(), BackplaneError> {
        self.subscription(address, true)
    }

    async fn unsubscribe(&self, address: &Address) -> Result<(), BackplaneError> {
        self.subscription(address, false)
    }

    fn health(&self) -> Health {
        if self.shared.down.load(AtomicOrdering::SeqCst) {
            return Health::Down("the memory bus is down".to_owned());
        }
        match &*self.phase() {
            Phase::Running(_) => Health::Up,
            Phase::New => Health::Down("not started".to_owned()),
            Phase::Stopped => Health::Down("stopped".to_owned()),
        }
    }

    async fn stop(&self) {
        let Some((_, task)) = self.leave() else {
            return;
        };
        if tokio::task::try_id() == Some(task.id()) {
            // Stopped from inside its own inbox: the flag already keeps every later message
            // out, and waiting for the task would wait for this very call.
            return;
        }
        // The task sees the flag before handing over another message; waiting for it means
        // a message being handed over right now has been handled when `stop` returns.
        let _ = task.await;
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::backplane::MessageId;
    use crate::testkit::{conn, node, user};

    /// Collects what it receives.
    #[derive(Default)]
    struct Collect {
        messages: Mutex<Vec<Message>>,
    }

    #[async_trait]
    impl Inbox for Collect {
        async fn receive(&self, message: Message) {
            self.messages.lock().expect("lock").push(message);
        }
    }

    impl Collect {
        fn payloads(&self) -> Vec<Bytes> {
            let messages = self.messages.lock().expect("lock");
            messages.iter().map(|m| m.payload.clone()).collect()
        }

        async fn wait_for(&self, n: usize) {
            tokio::time::timeout(Duration::from_secs(10), async {
                while self.messages.lock().expect("lock").len() < n {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            })
            .await
            .expect("messages arrive");
        }
    }

    fn message(seq: u64, to: Address, payload: &'static [u8]) -> Message {
        Message::new(
            MessageId {
                origin: node("a"),
                seq,
            },
            to,
            Vec::new(),
            Bytes::from_static(payload),
        )
    }

    async fn started(bus: &MemoryBus, name: &str) -> (Arc<dyn Backplane>, Arc<Collect>) {
        let endpoint = bus.endpoint();
        let inbox = Arc::new(Collect::default());
        endpoint
            .start(&node(name), inbox.clone())
            .await
            .expect("starts");
        (endpoint, inbox)
    }

    #[tokio::test]
    async fn messages_go_where_they_are_addressed() {
        let bus = MemoryBus::new();
        let (a, a_in) = started(&bus, "a").await;
        let (b, b_in) = started(&bus, "b").await;
        let group = Address::Group(Arc::from("g"));
        a.subscribe(&group).await.expect("subscribes");
        b.subscribe(&Address::User(user("bob")))
            .await
            .expect("subscribes");
        let mut to_b = message(1, Address::Node(node("b")), b"to b");
        to_b.connections = vec![conn("c1")];
        a.publish(&to_b).await.expect("publishes");
        a.publish(&message(2, group.clone(), b"to g"))
            .await
            .expect("publishes");
        a.publish(&message(3, Address::User(user("bob")), b"to bob"))
            .await
            .expect("publishes");
        a.publish(&message(4, Address::Node(node("z")), b"nobody"))
            .await
            .expect("publishes");
        b_in.wait_for(2).await;
        a_in.wait_for(1).await;
        assert_eq!(b_in.messages.lock().expect("lock")[0], to_b);
        assert_eq!(b_in.payloads(), [&b"to b"[..], b"to bob"]);
        assert_eq!(a_in.payloads(), [&b"to g"[..]]);
        assert_eq!(bus.published(), 4);
        assert_eq!(bus.delivered(&node("a")), 1);
        assert_eq!(bus.delivered(&node("b")), 2);
        assert_eq!(bus.delivered(&node("z")), 0);
    }

    #[tokio::test]
    async fn a_bus_that_is_down_refuses_work_but_delivers_what_it_queued() {
        let bus = MemoryBus::new();
        let (a, a_in) = started(&bus, "a").await;
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        struct Gated(Arc<tokio::sync::Semaphore>, Arc<Collect>);
        #[async_trait]
        impl Inbox for Gated {
            async fn receive(&self, message: Message) {
                let _permit = self.0.acquire().await.expect("open");
                self.1.receive(message).await;
            }
        }
        let b = bus.endpoint();
        let b_in = Arc::new(Collect::default());
        b.start(&node("b"), Arc::new(Gated(gate.clone(), b_in.clone())))
            .await
            .expect("starts");
        for seq in 1..=3 {
            a.publish(&message(seq, Address::Node(node("b")), b"queued"))
                .await
                .expect("publishes");
        }
        bus.set_down(true);
        assert!(matches!(a.health(), Health::Down(_)));
        let group = Address::Group(Arc::from("g"));
        for err in [
            a.publish(&message(4, Address::Node(node("b")), b"x"))
                .await
                .map(|_| ()),
            a.subscribe(&group).await,
            a.unsubscribe(&group).await,
        ] {
            let err = err.expect_err("the bus is down");
            assert!(matches!(err, BackplaneError::Unavailable { .. }), "{err}");
            assert!(err.is_transient());
        }
        gate.add_permits(10);
        b_in.wait_for(3).await;
        bus.set_down(false);
        assert_eq!(a.health(), Health::Up);
        a.publish(&message(5, Address::Node(node("a")), b"back"))
            .await
            .expect("publishes");
        a_in.wait_for(1).await;
        assert_eq!(bus.published(), 4);
    }

    #[tokio::test]
    async fn limits_and_misuse_are_errors() {
        let bus = MemoryBus::with_max_payload(4);
        let unstarted = bus.endpoint();
        assert!(matches!(unstarted.health(), Health::Down(_)));
        let err = unstarted
            .publish(&message(1, Address::All, b""))
            .await
            .expect_err("not started");
        assert!(!err.is_transient());
        let (a, _a_in) = started(&bus, "a").await;
        assert!(
            a.start(&node("a2"), Arc::new(Collect::default()))
                .await
                .is_err()
        );
        let other = bus.endpoint();
        assert!(
            other
                .start(&node("a"), Arc::new(Collect::default()))
                .await
                .is_err(),
            "two endpoints cannot run as one node"
        );
        assert!(matches!(
            a.publish(&message(1, Address::All, b"12345")).await,
            Err(BackplaneError::TooLarge { size: 5, max: 4 })
        ));
        a.publish(&message(2, Address::All, b"1234"))
            .await
            .expect("fits");
        assert!(matches!(
            a.subscribe(&Address::Node(node("a"))).await,
            Err(BackplaneError::Unsupported { .. })
        ));
        let caps = a.capabilities();
        assert_eq!(
            (caps.name, caps.delivery, caps.ordering, caps.max_payload),
            ("memory", DeliveryClass::AtMostOnce, Ordering::PerSender, 4)
        );
        assert!(caps.node_addressed && caps.channels);
        assert!(format!("{bus:?}").contains("\"a\""), "{bus:?}");
    }

    #[tokio::test]
    async fn nothing_arrives_after_stop_and_the_node_can_start_again() {
        let bus = MemoryBus::new();
        let (a, _a_in) = started(&bus, "a").await;
        let (b, b_in) = started(&bus, "b").await;
        for seq in 1..=200 {
            a.publish(&message(seq, Address::Node(node("b")), b"m"))
                .await
                .expect("publishes");
        }
        b.stop().await;
        let seen = b_in.messages.lock().expect("lock").len();
        assert_eq!(bus.delivered(&node("b")), seen as u64);
        a.publish(&message(201, Address::Node(node("b")), b"lost"))
            .await
            .expect("at most once: a message to a stopped node is dropped");
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(b_in.messages.lock().expect("lock").len(), seen);
        assert_eq!(b.health(), Health::Down("stopped".to_owned()));
        b.stop().await;
        let (_b2, b2_in) = started(&bus, "b").await;
        a.publish(&message(202, Address::Node(node("b")), b"again"))
            .await
            .expect("publishes");
        b2_in.wait_for(1).await;
        assert_eq!(bus.delivered(&node("b")), seen as u64 + 1);
    }
}
