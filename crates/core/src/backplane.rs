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

/// The wire encoding of a [`Message`], version 1.
///
/// ```text
/// version   u8 = 1
/// origin    len:varint, bytes       NodeId
/// seq       varint                  u64
/// to        kind:u8 (0 node, 1 user, 2 group, 3 all), then len:varint, bytes (not for all)
/// count     varint                  number of connection ids
/// ids       count × (len:varint, bytes)
/// payload   len:varint, bytes
/// ```
///
/// Varints are unsigned LEB128 in their shortest form. Every field is length-prefixed and the
/// message must end exactly after the payload, so a truncated or padded message is refused.
impl Message {
    /// The version byte [`encode`](Self::encode) writes and [`decode`](Self::decode) reads.
    pub const WIRE_VERSION: u8 = 1;

    /// The message in its wire encoding (see the type's documentation for the layout).
    pub fn encode(&self) -> Bytes {
        let (kind, name): (u8, &[u8]) = match &self.to {
            Address::Node(node) => (KIND_NODE, node.as_str().as_bytes()),
            Address::User(user) => (KIND_USER, user.as_str().as_bytes()),
            Address::Group(group) => (KIND_GROUP, group.as_bytes()),
            Address::All => (KIND_ALL, &[]),
        };
        let origin = self.id.origin.as_str().as_bytes();
        let ids_len: usize = self
            .connections
            .iter()
            .map(|c| MAX_VARINT + c.as_str().len())
            .sum();
        let mut out = Vec::with_capacity(
            1 + 5 * MAX_VARINT + origin.len() + 1 + name.len() + ids_len + self.payload.len(),
        );
        out.push(Self::WIRE_VERSION);
        put_bytes(&mut out, origin);
        put_varint(&mut out, self.id.seq);
        out.push(kind);
        if kind != KIND_ALL {
            put_bytes(&mut out, name);
        }
        put_varint(&mut out, self.connections.len() as u64);
        for connection in &self.connections {
            put_bytes(&mut out, connection.as_str().as_bytes());
        }
        put_bytes(&mut out, &self.payload);
        Bytes::from(out)
    }

    /// Reads a message written by [`encode`](Self::encode). The payload is a slice of `bytes`
    /// (no copy). Never panics, whatever the input.
    ///
    /// # Errors
    ///
    /// [`BackplaneError::Corrupt`] when `bytes` is not one complete message of a known
    /// version: truncated, padded, an unknown address kind, an invalid id (ids go through
    /// [`NodeId::new`], [`UserId::new`] and [`ConnectionId::new`], and a user id must be
    /// stored trimmed), a name that is not UTF-8, or a varint that is not in its shortest
    /// form.
    pub fn decode(bytes: Bytes) -> Result<Message, BackplaneError> {
        let mut reader = Reader {
            bytes: &bytes,
            pos: 0,
        };
        let version = reader.byte("the version")?;
        if version != Self::WIRE_VERSION {
            return Err(corrupt(format!(
                "unknown wire version {version} (this node reads version {})",
                Self::WIRE_VERSION
            )));
        }
        let origin = reader.text("the origin node id")?;
        let origin =
            NodeId::new(origin).map_err(|e| corrupt(format!("bad origin node id: {e}")))?;
        let seq = reader.varint("the sequence number")?;
        let kind_at = reader.pos;
        let to = match reader.byte("the address kind")? {
            KIND_NODE => {
                let node = reader.text("the node address")?;
                Address::Node(
                    NodeId::new(node).map_err(|e| corrupt(format!("bad node address: {e}")))?,
                )
            }
            KIND_USER => {
                let raw = reader.text("the user address")?;
                let user =
                    UserId::new(raw).map_err(|e| corrupt(format!("bad user address: {e}")))?;
                if user.as_str() != raw {
                    return Err(corrupt(
                        "bad user address: a user id is sent trimmed".to_owned(),
                    ));
                }
                Address::User(user)
            }
            KIND_GROUP => Address::Group(Arc::from(reader.text("the group address")?)),
            KIND_ALL => Address::All,
            other => {
                return Err(corrupt(format!(
                    "unknown address kind {other} at byte {kind_at}"
                )));
            }
        };
        let count = reader.varint("the connection count")?;
        // Every id takes at least two bytes (its length and one byte), so a count larger than
        // half of what is left is a lie: refuse it before allocating anything.
        let count = usize::try_from(count)
            .ok()
            .filter(|&n| n <= reader.remaining() / 2)
            .ok_or_else(|| {
                corrupt(format!(
                    "{count} connection ids cannot fit in the {} bytes left",
                    reader.remaining()
                ))
            })?;
        let mut connections = Vec::with_capacity(count);
        for index in 0..count {
            let raw = reader.text("a connection id")?;
            let id = ConnectionId::new(raw)
                .map_err(|e| corrupt(format!("bad connection id #{index}: {e}")))?;
            connections.push(id);
        }
        let (start, end) = reader.field("the payload")?;
        if reader.remaining() != 0 {
            return Err(corrupt(format!(
                "{} bytes after the end of the message",
                reader.remaining()
            )));
        }
        Ok(Message {
            id: MessageId { origin, seq },
            to,
            connections,
            payload: bytes.slice(start..end),
        })
    }
}

const KIND_NODE: u8 = 0;
const KIND_USER: u8 = 1;
const KIND_GROUP: u8 = 2;
const KIND_ALL: u8 = 3;

/// Longest LEB128 encoding of a `u64`.
const MAX_VARINT: usize = 10;

fn corrupt(message: String) -> BackplaneError {
    BackplaneError::Corrupt(message)
}

fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        // Truncation intended: the low seven bits, with the continuation bit.
        out.push((value & 0x7f) as u8 | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// A cursor over an encoded message; every read checks the bounds.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    fn truncated(&self, what: &str) -> BackplaneError {
        corrupt(format!(
            "truncated: the message ends at byte {} while reading {what}",
            self.bytes.len()
        ))
    }

    fn byte(&mut self, what: &str) -> Result<u8, BackplaneError> {
        let b = *self
            .bytes
            .get(self.pos)
            .ok_or_else(|| self.truncated(what))?;
        self.pos += 1;
        Ok(b)
    }

    fn varint(&mut self, what: &str) -> Result<u64, BackplaneError> {
        let start = self.pos;
        let mut value: u64 = 0;
        for i in 0..MAX_VARINT {
            let b = self.byte(what)?;
            let bits = u64::from(b & 0x7f);
            // The tenth byte holds only the top bit of a u64.
            if i == MAX_VARINT - 1 && b > 1 {
                return Err(corrupt(format!(
                    "{what} at byte {start} does not fit in 64 bits"
                )));
            }
            value |= bits << (7 * i);
            if b & 0x80 == 0 {
                if b == 0 && i > 0 {
                    return Err(corrupt(format!(
                        "{what} at byte {start} is not in its shortest form"
                    )));
                }
                return Ok(value);
            }
        }
        Err(corrupt(format!(
            "{what} at byte {start} does not fit in 64 bits"
        )))
    }

    /// A length-prefixed field: its range in the input.
    fn field(&mut self, what: &str) -> Result<(usize, usize), BackplaneError> {
        let len = self.varint(what)?;
        let len = usize::try_from(len)
            .ok()
            .filter(|&n| n <= self.remaining())
            .ok_or_else(|| self.truncated(what))?;
        let start = self.pos;
        self.pos += len;
        Ok((start, self.pos))
    }

    /// A length-prefixed UTF-8 field.
    fn text(&mut self, what: &str) -> Result<&'a str, BackplaneError> {
        let (start, end) = self.field(what)?;
        let bytes: &'a [u8] = self.bytes;
        let field = bytes.get(start..end).ok_or_else(|| self.truncated(what))?;
        std::str::from_utf8(field)
            .map_err(|_| corrupt(format!("{what} at byte {start} is not UTF-8")))
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
    /// [`Backplane::publish`] reports how many nodes a message was handed to
    /// ([`Reach::nodes`] is `Some`).
    pub reach: bool,
}

/// How far a published message got.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Reach {
    /// How many nodes the message was handed to (for a channel: the nodes subscribed to it
    /// when it was published; for a node: 1 if that node is known to be running, else 0), or
    /// `None` when the backplane cannot tell.
    pub nodes: Option<u64>,
}

impl Reach {
    /// A publication whose reach this backplane cannot tell.
    pub const UNKNOWN: Self = Self { nodes: None };

    /// A publication handed to `nodes` nodes.
    pub fn nodes(nodes: u64) -> Self {
        Self { nodes: Some(nodes) }
    }

    /// Whether the message is known to have reached no node at all.
    pub fn nobody(&self) -> bool {
        self.nodes == Some(0)
    }
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
    async fn publish(&self, message: &Message) -> Result<Reach, BackplaneError>;

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

    use proptest::prelude::*;

    fn node(s: &str) -> NodeId {
        NodeId::new(s).expect("valid")
    }

    fn conn(s: &str) -> ConnectionId {
        ConnectionId::new(s).expect("valid")
    }

    fn samples() -> Vec<Message> {
        let id = |seq| MessageId {
            origin: node("node-a"),
            seq,
        };
        let many: Vec<ConnectionId> = (0..300).map(|i| conn(&format!("c{i}"))).collect();
        vec![
            Message::new(
                id(1),
                Address::Node(node("node-b")),
                vec![conn("c1")],
                Bytes::from_static(b"{\"type\":1}\x1e"),
            ),
            Message::new(id(2), Address::Node(node("n")), Vec::new(), Bytes::new()),
            Message::new(
                id(3),
                Address::Node(node("n")),
                many,
                Bytes::from(vec![0xff; 3_000]),
            ),
            Message::new(
                id(4),
                Address::User(user("Åsa 名前 🚀")),
                Vec::new(),
                Bytes::from_static(b"x"),
            ),
            Message::new(
                id(5),
                Address::User(user("user:bob")),
                Vec::new(),
                Bytes::from_static(b"\0"),
            ),
            Message::new(
                id(6),
                Address::Group(Arc::from("")),
                Vec::new(),
                Bytes::from_static(b"{x}"),
            ),
            Message::new(
                id(7),
                Address::Group(Arc::from("a:b *")),
                vec![conn("~")],
                Bytes::new(),
            ),
            Message::new(
                id(u64::MAX),
                Address::All,
                Vec::new(),
                Bytes::from_static(b"all"),
            ),
            Message::new(id(0), Address::All, Vec::new(), Bytes::new()),
        ]
    }

    #[test]
    fn messages_round_trip() {
        for message in samples() {
            let encoded = message.encode();
            let decoded = Message::decode(encoded.clone()).expect("decodes");
            assert_eq!(decoded, message);
            assert_eq!(decoded.encode(), encoded, "the encoding is canonical");
        }
    }

    #[test]
    fn the_layout_is_as_documented() {
        let message = Message::new(
            MessageId {
                origin: node("a"),
                seq: 300,
            },
            Address::User(user("bo")),
            vec![conn("c")],
            Bytes::from_static(b"hi"),
        );
        let expected: &[u8] = &[
            1, // version
            1, b'a', // origin
            0xac, 0x02, // seq 300
            1, 2, b'b', b'o', // user "bo"
            1, 1, b'c', // one connection id
            2, b'h', b'i', // payload
        ];
        assert_eq!(&message.encode()[..], expected);
        let all = Message::new(
            MessageId {
                origin: node("a"),
                seq: 1,
            },
            Address::All,
            Vec::new(),
            Bytes::new(),
        );
        assert_eq!(&all.encode()[..], &[1, 1, b'a', 1, 3, 0, 0]);
    }

    #[test]
    fn the_payload_is_not_copied() {
        let message = &samples()[2];
        let encoded = message.encode();
        let decoded = Message::decode(encoded.clone()).expect("decodes");
        let range = encoded.as_ptr_range();
        assert!(range.contains(&decoded.payload.as_ptr()));
        assert_eq!(decoded.payload.as_ptr_range().end, range.end);
    }

    #[test]
    fn every_truncation_and_any_padding_is_refused() {
        for message in samples() {
            let encoded = message.encode();
            for len in 0..encoded.len() {
                let err = Message::decode(encoded.slice(..len))
                    .expect_err("a truncated message must be refused");
                assert!(matches!(err, BackplaneError::Corrupt(_)), "{err}");
                assert!(!err.is_transient());
            }
            let mut padded = encoded.to_vec();
            padded.push(0);
            let err = Message::decode(Bytes::from(padded)).expect_err("padding is refused");
            assert!(err.to_string().contains("1 bytes after the end"), "{err}");
        }
        let err = Message::decode(Bytes::new()).expect_err("empty");
        assert!(err.to_string().contains("truncated"), "{err}");
    }

    fn corrupt_text(bytes: &[u8]) -> String {
        match Message::decode(Bytes::copy_from_slice(bytes)) {
            Err(BackplaneError::Corrupt(text)) => text,
            other => panic!("{bytes:?} should be corrupt, got {other:?}"),
        }
    }

    #[test]
    fn forged_fields_are_refused_with_a_reason() {
        // version 2
        assert!(corrupt_text(&[2, 1, b'a', 1, 3, 0, 0]).contains("unknown wire version 2"));
        // origin "a b" is not a node id
        assert!(corrupt_text(&[1, 3, b'a', b' ', b'b', 1, 3, 0, 0]).contains("bad origin"));
        // address kind 9
        assert!(corrupt_text(&[1, 1, b'a', 1, 9, 0, 0]).contains("unknown address kind 9"));
        // a user id with surrounding blanks would not survive UserId::new unchanged
        assert!(corrupt_text(&[1, 1, b'a', 1, 1, 3, b' ', b'b', b' ', 0, 0]).contains("trimmed"));
        // an empty user id
        assert!(corrupt_text(&[1, 1, b'a', 1, 1, 0, 0, 0]).contains("bad user address"));
        // a node address with a slash
        assert!(corrupt_text(&[1, 1, b'a', 1, 0, 1, b'/', 0, 0]).contains("bad node address"));
        // a connection id with a space
        assert!(corrupt_text(&[1, 1, b'a', 1, 3, 1, 1, b' ', 0]).contains("connection id #0"));
        // a group name that is not UTF-8
        assert!(corrupt_text(&[1, 1, b'a', 1, 2, 1, 0xff, 0, 0]).contains("not UTF-8"));
        // seq 1 written in two bytes
        assert!(corrupt_text(&[1, 1, b'a', 0x81, 0x00, 3, 0, 0]).contains("shortest form"));
        // seq of eleven bytes
        let mut long = vec![1, 1, b'a'];
        long.extend([0xff; 10]);
        long.extend([3, 0, 0]);
        assert!(corrupt_text(&long).contains("64 bits"));
        // a payload length past the end
        assert!(corrupt_text(&[1, 1, b'a', 1, 3, 0, 5, b'x']).contains("truncated"));
    }

    #[test]
    fn a_forged_count_allocates_nothing() {
        // u64::MAX connection ids announced in a 20-byte message.
        let mut forged = vec![1, 1, b'a', 1, 3];
        forged.extend([0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01]);
        forged.extend([1, b'c', 0]);
        let text = corrupt_text(&forged);
        assert!(text.contains("cannot fit"), "{text}");
        // A count that just fits is read as ids.
        assert!(corrupt_text(&[1, 1, b'a', 1, 3, 1, 1, b'c']).contains("truncated"));
    }

    fn arb_node() -> impl Strategy<Value = NodeId> {
        "[A-Za-z0-9._~-]{1,64}".prop_map(|s| node(&s))
    }

    fn arb_address() -> impl Strategy<Value = Address> {
        prop_oneof![
            arb_node().prop_map(Address::Node),
            "\\PC{0,40}".prop_filter_map("blank user", |s| UserId::new(&s).ok().map(Address::User)),
            ".{0,40}".prop_map(|s| Address::Group(Arc::from(s))),
            Just(Address::All),
        ]
    }

    fn arb_message() -> impl Strategy<Value = Message> {
        (
            arb_node(),
            any::<u64>(),
            arb_address(),
            proptest::collection::vec("[A-Za-z0-9._~-]{1,128}", 0..20),
            proptest::collection::vec(any::<u8>(), 0..2000),
        )
            .prop_map(|(origin, seq, to, ids, payload)| {
                Message::new(
                    MessageId { origin, seq },
                    to,
                    ids.iter().map(|c| conn(c)).collect(),
                    Bytes::from(payload),
                )
            })
    }

    proptest! {
        #[test]
        fn any_message_round_trips(message in arb_message()) {
            let encoded = message.encode();
            let decoded = Message::decode(encoded.clone());
            prop_assert_eq!(decoded.as_ref().ok(), Some(&message));
            let cut = encoded.len() / 2;
            prop_assert!(Message::decode(encoded.slice(..cut)).is_err());
        }

        #[test]
        fn any_input_decodes_or_is_corrupt(input in proptest::collection::vec(any::<u8>(), 0..200)) {
            let input = Bytes::from(input);
            match Message::decode(input.clone()) {
                Ok(message) => prop_assert_eq!(message.encode(), input),
                Err(e) => prop_assert!(matches!(e, BackplaneError::Corrupt(_))),
            }
        }
    }

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
