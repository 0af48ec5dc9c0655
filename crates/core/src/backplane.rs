//! The [`Backplane`] trait: how a message reaches a socket held by another node.
//!
//! The store knows which node holds which connection; the backplane carries messages between
//! nodes; each node's registry writes to its own sockets. A backplane never decides who gets a
//! message: the server routes, the backplane transports.
//!
//! Two ways to address a node, both described by [`BackplaneCapabilities`]:
//!
//! * **node-addressed**: a message to [`Address::Node`] reaches exactly that node. Stores with
//!   lookup route this way: one message per node that holds recipients, carrying the ids of
//!   the target connections, and nothing to nodes that hold none.
//! * **channel-addressed**: a node subscribes to [`Address::User`], [`Address::Group`] or
//!   [`Address::All`] while it holds members, and a message to that address reaches every
//!   subscribed node once. Stores without lookup (the `groups` strategy) route users this
//!   way; groups and broadcasts always do.
//!
//! Channel names are built in one place, [`ChannelNames`], so no user or group name can ever
//! act as a pattern or collide with another channel. [`Message`] has one wire encoding
//! ([`Message::encode`], [`Message::decode`]) every backplane can carry as an opaque payload.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use crate::error::BoxError;
use crate::id::{ConnectionId, NodeId, UserId};

/// Where a backplane message goes.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Address {
    /// One node: only that node receives the message, whatever it subscribes to.
    Node(NodeId),
    /// Every node subscribed to this user's channel (nodes holding a connection of the user).
    User(UserId),
    /// Every node subscribed to this group's channel (nodes holding a member).
    Group(Arc<str>),
    /// Every node subscribed to the hub-wide channel (every running node).
    All,
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Node(node) => write!(f, "node {node}"),
            Self::User(user) => write!(f, "user {user:?}"),
            Self::Group(group) => write!(f, "group {group:?}"),
            Self::All => f.write_str("all"),
        }
    }
}

/// A message's id: the node that published it and its per-node sequence number. Sequence
/// numbers of one origin grow by one per message, so a receiver can drop duplicates.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MessageId {
    /// The publishing node.
    pub origin: NodeId,
    /// Per-origin sequence number, starting at 1.
    pub seq: u64,
}

/// One message between nodes: an already-serialized client record and who gets it.
///
/// The payload is sent to clients as it is, so a record is serialized once however many nodes
/// and connections it reaches.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Message {
    /// Who sent it, and its number.
    pub id: MessageId,
    /// Where it goes.
    pub to: Address,
    /// Whom it is for on the receiving node. For [`Address::Node`]: exactly these
    /// connections (when empty, nobody). For channel addresses: empty, meaning every local
    /// member of the user, group or hub.
    pub connections: Vec<ConnectionId>,
    /// The record to write to each recipient's socket (UTF-8 text for the JSON protocol).
    pub payload: Bytes,
}

impl Message {
    /// A message from `id.origin` to `to`.
    pub fn new(id: MessageId, to: Address, connections: Vec<ConnectionId>, payload: Bytes) -> Self {
        Self {
            id,
            to,
            connections,
            payload,
        }
    }
}

/// What a backplane promises about delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DeliveryClass {
    /// Delivered at most once: a message published while the link or a receiver is down is
    /// lost (plain Redis pub/sub).
    AtMostOnce,
    /// Messages published while the link is down wait in a bounded buffer and are sent once it
    /// is back; past the bound, publishing fails.
    Buffered,
    /// A receiver that lost its link resumes from the last message it saw (a stream or a
    /// table read from a position), within a retention bound.
    Resumable,
}

/// What a backplane promises about order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Ordering {
    /// No order is promised.
    Unordered,
    /// Messages from one node to one address arrive in the order they were published.
    PerSender,
}

/// What a backplane can do, as data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BackplaneCapabilities {
    /// Short name, as given to `--backplane`.
    pub name: &'static str,
    /// The delivery class.
    pub delivery: DeliveryClass,
    /// The ordering promise.
    pub ordering: Ordering,
    /// Largest [`Message::payload`] accepted, in bytes; larger ones fail with
    /// [`BackplaneError::TooLarge`].
    pub max_payload: usize,
    /// [`Address::Node`] is supported.
    pub node_addressed: bool,
    /// [`Backplane::subscribe`] and channel addresses ([`Address::User`], [`Address::Group`],
    /// [`Address::All`]) are supported.
    pub channels: bool,
}

/// Everything that can go wrong on a backplane. Shaped like
/// [`StoreError`](crate::StoreError): use [`BackplaneError::is_transient`] to decide whether
/// retrying later can help.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BackplaneError {
    /// The backplane cannot do this; its capabilities say so up front.
    #[error("the `{backplane}` backplane does not support {operation}")]
    Unsupported {
        /// The backplane's name.
        backplane: &'static str,
        /// The operation, in words.
        operation: &'static str,
    },
    /// The broker could not be reached. Transient.
    #[error("the backplane is unavailable: {message}")]
    Unavailable {
        /// What failed, in words.
        message: String,
        /// The driver's error, if any.
        #[source]
        source: Option<BoxError>,
    },
    /// The operation did not finish in time. Transient.
    #[error("the backplane did not answer within {0:?}")]
    Timeout(Duration),
    /// The payload is larger than the backplane carries. Permanent.
    #[error("the message is {size} bytes; the backplane carries at most {max}")]
    TooLarge {
        /// The payload's size in bytes.
        size: usize,
        /// The largest payload accepted.
        max: usize,
    },
    /// Messages wait for the link to come back, and the wait buffer is full. Transient.
    #[error("the backplane is down and its buffer is full: {message}")]
    Backlogged {
        /// Which bound was reached, in words.
        message: String,
    },
    /// A received message could not be decoded. Permanent.
    #[error("a backplane message is corrupt: {0}")]
    Corrupt(String),
    /// The broker answered with an error.
    #[error("the backplane failed: {message}")]
    Backend {
        /// What failed, in words.
        message: String,
        /// Whether retrying later can succeed.
        transient: bool,
        /// The driver's error, if any.
        #[source]
        source: Option<BoxError>,
    },
}

impl BackplaneError {
    /// Shorthand for [`BackplaneError::Unsupported`].
    pub fn unsupported(backplane: &'static str, operation: &'static str) -> Self {
        Self::Unsupported {
            backplane,
            operation,
        }
    }

    /// Whether the same operation may succeed if retried later.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Unavailable { .. } | Self::Timeout(_) | Self::Backlogged { .. } => true,
            Self::Backend { transient, .. } => *transient,
            Self::Unsupported { .. } | Self::TooLarge { .. } | Self::Corrupt(_) => false,
        }
    }
}

/// Whether a backplane's link works, for readiness probes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    /// Messages flow.
    Up,
    /// The link is down (or was never up); the text says why.
    Down(String),
}

/// Receives the messages a backplane delivers to one node.
#[async_trait]
pub trait Inbox: Send + Sync + 'static {
    /// Handles one message. A backplane calls this for one message at a time, in arrival
    /// order, and waits for it to return before handing over the next; an inbox that must
    /// wait (a recipient's full queue) slows down this node's incoming messages only.
    async fn receive(&self, message: Message);
}

/// Delivery between nodes, apart from the store (state) and the registry (this node's
/// sockets). One value per node: [`start`](Self::start) binds it to its node.
///
/// # Contract
///
/// * [`publish`](Self::publish) of a message to [`Address::Node`] reaches that node's inbox
///   once (while healthy), and no other node's.
/// * A message to a channel address reaches, once each, the inbox of every node subscribed to
///   it when it is published, the publisher included if it subscribes.
/// * [`subscribe`](Self::subscribe) and [`unsubscribe`](Self::unsubscribe) are idempotent:
///   a node is subscribed to an address or it is not. Counting local members is the server's
///   job.
/// * Payloads are carried byte for byte, up to [`BackplaneCapabilities::max_payload`].
/// * Capabilities state the delivery class and the ordering promise; the conformance suite
///   holds a backplane to them.
#[async_trait]
pub trait Backplane: Send + Sync + fmt::Debug + 'static {
    /// What this backplane can do.
    fn capabilities(&self) -> BackplaneCapabilities;

    /// Starts receiving as `node`: from now on every message to [`Address::Node`]`(node)` and
    /// to the channels this node subscribes to is handed to `inbox`. Called once, before any
    /// other method.
    ///
    /// # Errors
    ///
    /// When the broker cannot be reached or the node cannot listen.
    async fn start(&self, node: &NodeId, inbox: Arc<dyn Inbox>) -> Result<(), BackplaneError>;

    /// Publishes `message` to `message.to`.
    ///
    /// # Errors
    ///
    /// [`BackplaneError::TooLarge`] past the payload limit; [`BackplaneError::Unsupported`]
    /// for an address kind the capabilities exclude; link failures.
    async fn publish(&self, message: &Message) -> Result<(), BackplaneError>;

    /// Subscribes this node to a channel address ([`Address::User`], [`Address::Group`] or
    /// [`Address::All`]). Idempotent.
    ///
    /// # Errors
    ///
    /// [`BackplaneError::Unsupported`] for [`Address::Node`] or when channels are not
    /// supported; link failures.
    async fn subscribe(&self, address: &Address) -> Result<(), BackplaneError>;

    /// Ends this node's subscription to a channel address. Idempotent.
    ///
    /// # Errors
    ///
    /// As [`subscribe`](Self::subscribe).
    async fn unsubscribe(&self, address: &Address) -> Result<(), BackplaneError>;

    /// Whether the link works right now. Cheap: no I/O.
    fn health(&self) -> Health;

    /// Stops receiving and releases the link. Idempotent; nothing reaches the inbox after it
    /// returns.
    async fn stop(&self);
}

/// Builds channel names from addresses, the one place they are made.
///
/// `{prefix}:node:{id}`, `{prefix}:user:{name}`, `{prefix}:group:{name}` and `{prefix}:all`,
/// where user and group names are percent-encoded: every byte outside `A-Z a-z 0-9 - . _`
/// becomes `%XX`. So a name never contains `*`, `?`, `[`, `{`, `:` or whitespace (it can
/// never act as a pattern, a hash tag or a separator), and different addresses always give
/// different channels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelNames {
    prefix: Arc<str>,
}

/// A channel prefix that is not 1 to [`ChannelNames::MAX_PREFIX`] characters from
/// `A-Z a-z 0-9 - . _`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid channel prefix {0:?}: use 1 to 32 characters from A-Z, a-z, 0-9, '-', '.' and '_'"
)]
pub struct InvalidPrefix(pub String);

impl Default for ChannelNames {
    fn default() -> Self {
        Self {
            prefix: Arc::from(Self::DEFAULT_PREFIX),
        }
    }
}

impl ChannelNames {
    /// The prefix used unless one is configured.
    pub const DEFAULT_PREFIX: &'static str = "switchboard";
    /// Longest prefix accepted.
    pub const MAX_PREFIX: usize = 32;

    /// Channel names under `prefix` (for example one per deployment sharing a broker).
    ///
    /// # Errors
    ///
    /// [`InvalidPrefix`] when `prefix` is empty, too long or has other characters.
    pub fn new(prefix: &str) -> Result<Self, InvalidPrefix> {
        let valid = !prefix.is_empty()
            && prefix.len() <= Self::MAX_PREFIX
            && prefix.bytes().all(unreserved);
        if !valid {
            return Err(InvalidPrefix(prefix.to_owned()));
        }
        Ok(Self {
            prefix: Arc::from(prefix),
        })
    }

    /// The prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The channel of `address`.
    pub fn channel(&self, address: &Address) -> String {
        let mut out = String::with_capacity(self.prefix.len() + 16);
        out.push_str(&self.prefix);
        match address {
            Address::Node(node) => {
                out.push_str(":node:");
                // Node ids are already from the unreserved set (plus '~'); encode anyway so
                // the rule is the same for every name.
                encode_into(node.as_str(), &mut out);
            }
            Address::User(user) => {
                out.push_str(":user:");
                encode_into(user.as_str(), &mut out);
            }
            Address::Group(group) => {
                out.push_str(":group:");
                encode_into(group, &mut out);
            }
            Address::All => out.push_str(":all"),
        }
        out
    }
}

/// Bytes kept as they are in channel names.
fn unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_')
}

fn encode_into(name: &str, out: &mut String) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for &b in name.as_bytes() {
        if unreserved(b) {
            out.push(char::from(b));
        } else {
            out.push('%');
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 0xf)]));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(s: &str) -> UserId {
        UserId::new(s).expect("valid")
    }

    #[test]
    fn hostile_names_never_act_as_patterns_or_collide() {
        let names = ChannelNames::default();
        let addresses = [
            Address::User(user("*")),
            Address::User(user("a:b")),
            Address::User(user("{x}")),
            Address::User(user("user:bob")),
            Address::User(user("bob")),
            Address::User(user("Åsa 名前 🚀")),
            Address::User(user("%41")),
            Address::User(user("A")),
            Address::Group(Arc::from("bob")),
            Address::Group(Arc::from("user:bob")),
            Address::Group(Arc::from("*")),
            Address::Group(Arc::from("")),
            Address::Node(NodeId::new("bob").expect("valid")),
            Address::All,
        ];
        let channels: Vec<String> = addresses.iter().map(|a| names.channel(a)).collect();
        for channel in &channels {
            let rest = channel
                .strip_prefix("switchboard:")
                .expect("every channel starts with the prefix");
            let (_, name) = rest.split_once(':').unwrap_or((rest, ""));
            assert!(
                name.bytes().all(|b| unreserved(b) || b == b'%'),
                "{channel:?} holds a special character"
            );
        }
        let distinct: std::collections::BTreeSet<&String> = channels.iter().collect();
        assert_eq!(distinct.len(), channels.len(), "{channels:#?}");
        assert_eq!(
            names.channel(&Address::User(user("user:bob"))),
            "switchboard:user:user%3Abob"
        );
        assert_eq!(names.channel(&Address::All), "switchboard:all");
    }

    #[test]
    fn prefixes_are_checked() {
        assert!(ChannelNames::new("app-1.prod_eu").is_ok());
        for bad in ["", "a:b", "x*", "{x}", &"p".repeat(33)] {
            assert!(ChannelNames::new(bad).is_err(), "{bad:?}");
        }
        let names = ChannelNames::new("t1").expect("valid");
        assert_eq!(
            names.channel(&Address::Group(Arc::from("room 1"))),
            "t1:group:room%201"
        );
    }

    #[test]
    fn errors_are_classified() {
        assert!(BackplaneError::Timeout(Duration::from_secs(1)).is_transient());
        assert!(
            BackplaneError::Backlogged {
                message: "1000 messages".into()
            }
            .is_transient()
        );
        assert!(!BackplaneError::TooLarge { size: 2, max: 1 }.is_transient());
        assert!(!BackplaneError::unsupported("memory", "x").is_transient());
    }
}
