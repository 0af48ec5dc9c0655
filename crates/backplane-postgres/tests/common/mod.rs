//! What the integration tests share: a recording inbox and message builders.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use switchboard_core::{Address, Inbox, Message, MessageId, NodeId, async_trait};
use tokio::sync::watch;
use tokio::time::Instant;

/// Records every message a node receives.
pub struct Recorder {
    messages: Mutex<Vec<Message>>,
    changes: watch::Sender<usize>,
}

impl Recorder {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            messages: Mutex::new(Vec::new()),
            changes: watch::channel(0).0,
        })
    }

    pub fn all(&self) -> Vec<Message> {
        self.messages
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Waits until `n` messages arrived, at most `bound`; panics otherwise.
    pub async fn wait_for(&self, n: usize, bound: Duration) {
        let mut changes = self.changes.subscribe();
        let deadline = Instant::now() + bound;
        loop {
            if self.all().len() >= n {
                return;
            }
            if tokio::time::timeout_at(deadline, changes.changed())
                .await
                .is_err()
            {
                panic!("{} of {n} messages within {bound:?}", self.all().len());
            }
        }
    }

    /// How often each message id arrived.
    pub fn counts(&self) -> BTreeMap<MessageId, usize> {
        let mut counts = BTreeMap::new();
        for m in self.all() {
            *counts.entry(m.id).or_insert(0) += 1;
        }
        counts
    }
}

#[async_trait]
impl Inbox for Recorder {
    async fn receive(&self, message: Message) {
        let len = {
            let mut messages = self.messages.lock().unwrap_or_else(PoisonError::into_inner);
            messages.push(message);
            messages.len()
        };
        self.changes.send_replace(len);
    }
}

/// Numbers the messages of one origin.
pub struct Origin {
    pub node: NodeId,
    seq: AtomicU64,
}

impl Origin {
    pub fn new(node: &str) -> Self {
        Self {
            node: NodeId::new(node).expect("a valid node id"),
            seq: AtomicU64::new(1),
        }
    }

    pub fn message(&self, to: Address, payload: impl Into<Bytes>) -> Message {
        Message::new(
            MessageId {
                origin: self.node.clone(),
                seq: self.seq.fetch_add(1, Ordering::Relaxed),
            },
            to,
            Vec::new(),
            payload.into(),
        )
    }
}

static SCHEMAS: AtomicU64 = AtomicU64::new(0);

/// A schema name no other test of this process uses.
pub fn fresh_schema(test: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    format!(
        "t_{test}_{}_{nanos}_{}",
        std::process::id(),
        SCHEMAS.fetch_add(1, Ordering::Relaxed)
    )
}
