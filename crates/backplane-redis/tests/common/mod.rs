//! Helpers shared by the Redis backplane tests.

#![allow(dead_code)]

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use switchboard_core::{
    Address, Backplane, ChannelNames, Health, Inbox, Message, MessageId, NodeId, async_trait,
};
use switchboard_redis::{RedisBackplane, RedisConfig};
use tokio::sync::watch;

/// The bound on every wait in these tests.
pub const WAIT: Duration = Duration::from_secs(30);

/// Records what a node receives.
pub struct Collect {
    messages: Mutex<Vec<Message>>,
    changes: watch::Sender<usize>,
}

impl Default for Collect {
    fn default() -> Self {
        Self {
            messages: Mutex::new(Vec::new()),
            changes: watch::channel(0).0,
        }
    }
}

#[async_trait]
impl Inbox for Collect {
    async fn receive(&self, message: Message) {
        let len = {
            let mut messages = self.messages.lock().unwrap_or_else(PoisonError::into_inner);
            messages.push(message);
            messages.len()
        };
        self.changes.send_replace(len);
    }
}

impl Collect {
    pub fn all(&self) -> Vec<Message> {
        self.messages
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub fn len(&self) -> usize {
        self.messages
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// Waits (bounded) until at least `n` messages arrived.
    pub async fn wait_for(&self, n: usize) {
        let mut changes = self.changes.subscribe();
        tokio::time::timeout(WAIT, changes.wait_for(|len| *len >= n))
            .await
            .unwrap_or_else(|_| panic!("{n} messages within {WAIT:?}; got {}", self.len()))
            .expect("the sender lives in self");
    }

    /// Payloads as text, in arrival order.
    pub fn texts(&self) -> Vec<String> {
        self.all()
            .iter()
            .map(|m| String::from_utf8_lossy(&m.payload).into_owned())
            .collect()
    }
}

pub fn node(name: &str) -> NodeId {
    NodeId::new(name).expect("a valid node id")
}

/// A namespace no other test uses.
pub fn namespace(tag: &str) -> ChannelNames {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .subsec_nanos();
    ChannelNames::new(&format!("t{tag}{nanos:x}")).expect("a valid prefix")
}

pub fn message(origin: &NodeId, seq: u64, to: Address, payload: impl Into<Bytes>) -> Message {
    Message::new(
        MessageId {
            origin: origin.clone(),
            seq,
        },
        to,
        Vec::new(),
        payload.into(),
    )
}

/// A started endpoint and its inbox.
pub async fn started(config: RedisConfig, name: &str) -> (Arc<RedisBackplane>, Arc<Collect>) {
    let plane = Arc::new(RedisBackplane::new(config).expect("a valid configuration"));
    let inbox = Arc::new(Collect::default());
    plane
        .start(&node(name), inbox.clone())
        .await
        .expect("starts");
    (plane, inbox)
}

/// Waits (bounded) until `plane` reports `up` (true: Up, false: Down).
pub async fn wait_health(plane: &dyn Backplane, up: bool) {
    tokio::time::timeout(WAIT, async {
        while matches!(plane.health(), Health::Up) != up {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "health did not become {} within {WAIT:?}",
            if up { "Up" } else { "Down" }
        )
    });
}
