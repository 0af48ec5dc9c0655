//! Routing: the one place a target becomes connections.
//!
//! A message for a target (one connection, a user, a group, everyone) is serialized once by
//! the hub and handed to [`Router::deliver`], which
//!
//! * queues it for the recipients this node holds, in-process (never through the backplane);
//! * with a store that can look users up, sends **one** backplane message to each other node
//!   that holds recipients, carrying their connection ids (nodes that hold none get nothing);
//! * for groups, everyone, and users under a store without lookup, publishes once on the
//!   target's channel, which every node holding members subscribes to;
//! * reports what it did in a [`Delivery`]: local, forwarded (nodes, connections),
//!   published, unreachable.
//!
//! Messages arriving from other nodes take the local half of the same path
//! ([`Router::receive`]).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use async_trait::async_trait;
use axum::extract::ws::Utf8Bytes;
use bytes::Bytes;
use switchboard_core::{
    Address, Backplane, BackplaneError, Capabilities, ConnectionId, ConnectionStore, Inbox,
    Message, MessageId, NodeId, StoreError, UserId,
};

use crate::dedupe::{Seen, Verdict};
use crate::registry::{Fanout, Registry};
use crate::subscriptions::Subscriptions;
use crate::throttle::Throttle;

/// Log lines about connections closed for not reading: a client decides how often that happens.
static NOT_READING: Throttle = Throttle::new(10, Duration::from_secs(10));

/// Log lines about recipients on other nodes that could not be reached.
static UNREACHABLE: Throttle = Throttle::new(1, Duration::from_secs(10));

/// Log lines about undecodable messages from other nodes.
static BAD_MESSAGE: Throttle = Throttle::new(1, Duration::from_secs(10));

/// Who a message is for.
#[derive(Debug, Clone)]
pub(crate) enum Target {
    /// One connection, on whichever node holds it.
    Connection(ConnectionId),
    /// Every connection of a user, on every node.
    User(UserId),
    /// Every member of a group, on every node.
    Group(Arc<str>),
    /// Every connection of the hub, on every node.
    All,
}

/// What a send did: how many connections it reached here and elsewhere, and what it could not
/// reach.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[must_use]
#[non_exhaustive]
pub struct Delivery {
    /// Connections on this node the message was queued for.
    pub local: usize,
    /// Connections on other nodes the message was handed to the backplane for.
    pub forwarded: Forwarded,
    /// The message was published on a channel (a group, everyone, or a user under a store
    /// that cannot look users up) that at least one node listens to, or whose listeners the
    /// backplane cannot count: members on other nodes get it, in numbers this node does not
    /// know.
    pub published: bool,
    /// Connections on other nodes the message could not be handed to: no backplane is
    /// configured, or it failed. Those connections exist but did not get the message.
    pub unreachable: usize,
    /// A channel publish failed: members on other nodes, if there are any, did not get the
    /// message.
    pub publish_failed: bool,
    /// Connections on this node that could not take the message because they do not read
    /// their messages: their queue stayed full for the whole
    /// [`send_timeout`](crate::HubOptions::send_timeout). Those connections are being closed.
    pub not_reading: usize,
}

/// The part of a [`Delivery`] handed to other nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct Forwarded {
    /// Nodes that got one backplane message each.
    pub nodes: usize,
    /// Connections those messages were for.
    pub connections: usize,
}

impl Delivery {
    /// Connections the message reached: queued here or handed to the node that holds them.
    pub fn reached(&self) -> usize {
        self.local + self.forwarded.connections
    }

    /// Whether nobody was there to reach: the target has no live connection anywhere (as far
    /// as this node can know), so nothing was queued, forwarded or published.
    pub fn nobody_there(&self) -> bool {
        self.reached() == 0
            && !self.published
            && self.unreachable == 0
            && !self.publish_failed
            && self.not_reading == 0
    }

    /// Whether recipients on other nodes missed the message because the backplane is missing
    /// or failed.
    pub fn missed_other_nodes(&self) -> bool {
        self.unreachable > 0 || self.publish_failed
    }
}

/// Why a delivery failed as a whole.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DeliveryError {
    /// Looking up the target's connections failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Routes messages of one hub: the store, this node's registry and the backplane.
#[derive(Debug)]
pub(crate) struct Router {
    pub(crate) store: Arc<dyn ConnectionStore>,
    pub(crate) capabilities: Capabilities,
    pub(crate) registry: Registry,
    pub(crate) node: NodeId,
    /// How long a send waits for room in a full queue before the recipient counts as not
    /// reading.
    pub(crate) send_timeout: Duration,
    pub(crate) backplane: Option<Arc<dyn Backplane>>,
    pub(crate) subscriptions: Subscriptions,
    /// Sequence number of the last message this node published.
    seq: AtomicU64,
    /// Recent messages from other nodes, to drop repeats.
    seen: Seen,
}

impl Router {
    pub(crate) fn new(
        store: Arc<dyn ConnectionStore>,
        node: NodeId,
        backplane: Option<Arc<dyn Backplane>>,
        send_timeout: Duration,
    ) -> Self {
        Self {
            capabilities: store.capabilities(),
            store,
            registry: Registry::default(),
            node,
            send_timeout,
            backplane,
            subscriptions: Subscriptions::default(),
            seq: AtomicU64::new(0),
            seen: Seen::default(),
        }
    }

    /// Whether users are reached through per-user channels (stores without lookup) rather
    /// than by looking up their connections.
    pub(crate) fn user_channels(&self) -> bool {
        !self.capabilities.lookup && self.channels().is_some()
    }

    /// The backplane, if it carries channel addresses.
    pub(crate) fn channels(&self) -> Option<&Arc<dyn Backplane>> {
        self.backplane
            .as_ref()
            .filter(|backplane| backplane.capabilities().channels)
    }

    /// Queues `record` for every connection of `target`, exactly once each, on every node.
    /// Full queues on this node are waited for (up to the send timeout): the sender is slowed
    /// down, never its target.
    pub(crate) async fn deliver(
        &self,
        target: &Target,
        record: Utf8Bytes,
    ) -> Result<Delivery, DeliveryError> {
        let mut fanout = Fanout::default();
        let mut report = Delivery::default();
        match target {
            Target::Connection(id) => {
                if !self.registry.offer_one(id, &record, &mut fanout)
                    && let Some(node) = node_of(id).filter(|n| *n != self.node)
                {
                    self.forward(&node, vec![id.clone()], &record, &mut report)
                        .await;
                }
            }
            Target::User(user) if self.capabilities.lookup => {
                let records = self.store.connections(user).await?;
                // Usually every record is local, and this map stays empty (no allocation).
                let mut remote: BTreeMap<&NodeId, Vec<ConnectionId>> = BTreeMap::new();
                for r in &records {
                    if r.node() == &self.node {
                        self.registry.offer_one(r.id(), &record, &mut fanout);
                    } else {
                        remote.entry(r.node()).or_default().push(r.id().clone());
                    }
                }
                for (node, ids) in remote {
                    self.forward(node, ids, &record, &mut report).await;
                }
            }
            Target::User(user) => {
                self.registry.offer_user(user, &record, &mut fanout);
                self.publish(Address::User(user.clone()), &record, &mut report)
                    .await;
            }
            Target::Group(group) => {
                self.registry.offer_group(group, &record, &mut fanout);
                self.publish(Address::Group(group.clone()), &record, &mut report)
                    .await;
            }
            Target::All => {
                self.registry.offer_all(&record, &mut fanout);
                self.publish(Address::All, &record, &mut report).await;
            }
        }
        self.finish(fanout, &record, &mut report).await;
        Ok(report)
    }

    /// Delivers a message from another node to the connections it names on this node.
    pub(crate) async fn receive(&self, message: Message) {
        if message.id.origin == self.node {
            // A channel publication of this node coming back: its local members were served
            // in-process when it was sent.
            return;
        }
        match self.seen.check(&message.id) {
            Verdict::New => {}
            Verdict::Repeat => return,
            Verdict::TooOld => {
                if let Some(suppressed) = BAD_MESSAGE.allow() {
                    tracing::debug!(
                        origin = %message.id.origin,
                        seq = message.id.seq,
                        suppressed,
                        "a message from another node arrived too late to check for a repeat; delivering it"
                    );
                }
            }
        }
        let record = match Utf8Bytes::try_from(message.payload) {
            Ok(record) => record,
            Err(_) => {
                if let Some(suppressed) = BAD_MESSAGE.allow() {
                    tracing::warn!(
                        origin = %message.id.origin,
                        suppressed,
                        "dropped a message from another node: its payload is not UTF-8"
                    );
                }
                return;
            }
        };
        let mut fanout = Fanout::default();
        match &message.to {
            Address::Node(node) if *node == self.node => {
                self.registry
                    .offer(message.connections.iter(), &record, &mut fanout);
            }
            Address::Node(_) => return,
            Address::User(user) => self.registry.offer_user(user, &record, &mut fanout),
            Address::Group(group) => self.registry.offer_group(group, &record, &mut fanout),
            Address::All => self.registry.offer_all(&record, &mut fanout),
        }
        let mut report = Delivery::default();
        self.finish(fanout, &record, &mut report).await;
    }

    /// Waits for room in the full queues of `fanout` and completes the report.
    async fn finish(&self, mut fanout: Fanout, record: &Utf8Bytes, report: &mut Delivery) {
        let closed = fanout.finish(record, self.send_timeout).await;
        if closed > 0
            && let Some(suppressed) = NOT_READING.allow()
        {
            tracing::warn!(
                connections = closed,
                suppressed,
                wait = ?self.send_timeout,
                "closing connections that do not read their messages: their queue stayed full"
            );
        }
        report.local = fanout.queued;
        report.not_reading = fanout.not_reading;
    }

    fn next_id(&self) -> MessageId {
        MessageId {
            origin: self.node.clone(),
            seq: self.seq.fetch_add(1, Ordering::Relaxed) + 1,
        }
    }

    /// Hands `record` for `ids` to the node that holds them.
    async fn forward(
        &self,
        node: &NodeId,
        ids: Vec<ConnectionId>,
        record: &Utf8Bytes,
        report: &mut Delivery,
    ) {
        let count = ids.len();
        let Some(backplane) = self
            .backplane
            .as_ref()
            .filter(|b| b.capabilities().node_addressed)
        else {
            report.unreachable += count;
            if let Some(suppressed) = UNREACHABLE.allow() {
                tracing::warn!(
                    node = %node,
                    connections = count,
                    suppressed,
                    "connections on another node were not reached: no backplane is configured"
                );
            }
            return;
        };
        let message = Message::new(
            self.next_id(),
            Address::Node(node.clone()),
            ids,
            Bytes::from(record.clone()),
        );
        match backplane.publish(&message).await {
            // The backplane knows the node is not running (it crashed and its lease has not
            // run out yet): its connections cannot be reached.
            Ok(reach) if reach.nobody() => report.unreachable += count,
            Ok(_) => {
                report.forwarded.nodes += 1;
                report.forwarded.connections += count;
            }
            Err(e) => {
                report.unreachable += count;
                unreachable_warning(&e, &message.to);
            }
        }
    }

    /// Publishes `record` on the channel of `address`, for the members other nodes hold.
    async fn publish(&self, address: Address, record: &Utf8Bytes, report: &mut Delivery) {
        let Some(backplane) = self.channels() else {
            return;
        };
        let message = Message::new(
            self.next_id(),
            address,
            Vec::new(),
            Bytes::from(record.clone()),
        );
        match backplane.publish(&message).await {
            // Published to nobody: no node holds a member (as far as the backplane knows).
            Ok(reach) => report.published |= !reach.nobody(),
            Err(e) => {
                report.publish_failed = true;
                unreachable_warning(&e, &message.to);
            }
        }
    }

    /// The inbox this router's backplane delivers to.
    pub(crate) fn inbox(self: &Arc<Self>) -> Arc<dyn Inbox> {
        Arc::new(Incoming {
            router: Arc::downgrade(self),
        })
    }
}

fn unreachable_warning(error: &BackplaneError, to: &Address) {
    if let Some(suppressed) = UNREACHABLE.allow() {
        tracing::warn!(
            error = %error,
            to = %to,
            suppressed,
            "a message for other nodes could not be handed to the backplane"
        );
    }
}

/// The separator between the node and the random part of a connection id.
const NODE_SEPARATOR: char = '~';

/// A fresh connection id naming `node`: `<node>~<22 random characters>`. The node part lets
/// any node send to the connection without asking the store where it is.
pub(crate) fn connection_id(node: &NodeId, random: &str) -> ConnectionId {
    // Node ids are at most 64 bytes and the random part 22 base64url characters: within the
    // 128-byte limit, every character in the allowed set.
    ConnectionId::new(&format!("{node}{NODE_SEPARATOR}{random}"))
        .expect("a node id, '~' and base64url characters form a valid connection id")
}

/// The node a connection id names, if it names one.
pub(crate) fn node_of(id: &ConnectionId) -> Option<NodeId> {
    let (node, _) = id.as_str().rsplit_once(NODE_SEPARATOR)?;
    NodeId::new(node).ok()
}

/// Hands messages from the backplane to the router.
struct Incoming {
    router: Weak<Router>,
}

#[async_trait]
impl Inbox for Incoming {
    async fn receive(&self, message: Message) {
        if let Some(router) = self.router.upgrade() {
            router.receive(message).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_ids_name_their_node() {
        let node = NodeId::new("web-1~x").expect("valid");
        let id = connection_id(&node, "AAAAAAAAAAAAAAAAAAAAAA");
        assert_eq!(id.as_str(), "web-1~x~AAAAAAAAAAAAAAAAAAAAAA");
        assert_eq!(node_of(&id), Some(node));
        let plain = ConnectionId::new("abc").expect("valid");
        assert_eq!(node_of(&plain), None);
        let longest = NodeId::new(&"n".repeat(NodeId::MAX_LEN)).expect("valid");
        let id = connection_id(&longest, "AAAAAAAAAAAAAAAAAAAAAA");
        assert_eq!(node_of(&id), Some(longest));
    }

    #[test]
    fn reports_tell_offline_from_elsewhere() {
        assert!(Delivery::default().nobody_there());
        let forwarded = Delivery {
            forwarded: Forwarded {
                nodes: 1,
                connections: 2,
            },
            ..Delivery::default()
        };
        assert!(!forwarded.nobody_there());
        assert_eq!(forwarded.reached(), 2);
        let unreachable = Delivery {
            unreachable: 1,
            ..Delivery::default()
        };
        assert!(!unreachable.nobody_there());
        assert!(unreachable.missed_other_nodes());
    }
}
