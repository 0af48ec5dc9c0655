//! The node's own live sockets: connection id → outgoing queue, and local groups.
//!
//! This is not the [`ConnectionStore`](switchboard_core::ConnectionStore): the store says which
//! connections a user has anywhere; the registry holds the write ends of the sockets this node
//! serves.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use axum::extract::ws::Utf8Bytes;
use dashmap::DashMap;
use switchboard_core::ConnectionId;
use tokio::sync::Notify;

/// The outgoing queue of one local connection: whole serialized records, shared between all
/// recipients of a fan-out, waiting for the connection's session to write them.
///
/// Lean on purpose (it exists once per connection): an idle mailbox holds no buffer, senders
/// never wait, and the session takes a whole batch under one lock.
#[derive(Debug)]
pub(crate) struct Mailbox {
    queue: Mutex<VecDeque<Utf8Bytes>>,
    capacity: usize,
    /// Wakes the session: records arrived, or the queue overflowed.
    signal: Notify,
    overflowed: AtomicBool,
}

/// What the session should do next with its mailbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MailboxEvent {
    /// Records are waiting.
    Ready,
    /// The queue overflowed: the client does not read; close the connection.
    Overflowed,
}

impl Mailbox {
    fn new(capacity: usize) -> Self {
        Self {
            queue: Mutex::new(VecDeque::new()),
            capacity: capacity.max(1),
            signal: Notify::new(),
            overflowed: AtomicBool::new(false),
        }
    }

    fn queue(&self) -> std::sync::MutexGuard<'_, VecDeque<Utf8Bytes>> {
        // The queue holds plain values; a panic elsewhere cannot leave it inconsistent.
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues a record without waiting.
    fn push(&self, record: &Utf8Bytes) -> Sent {
        let mut queue = self.queue();
        if queue.len() >= self.capacity {
            drop(queue);
            self.overflowed.store(true, Ordering::Release);
            self.signal.notify_one();
            return Sent::Overflow;
        }
        queue.push_back(record.clone());
        drop(queue);
        self.signal.notify_one();
        Sent::Queued
    }

    /// Waits until records are queued or the queue overflowed. Cancel-safe.
    pub(crate) async fn ready(&self) -> MailboxEvent {
        loop {
            if self.overflowed.load(Ordering::Acquire) {
                return MailboxEvent::Overflowed;
            }
            if !self.queue().is_empty() {
                return MailboxEvent::Ready;
            }
            // A push between the check and here leaves a permit: this returns at once.
            self.signal.notified().await;
        }
    }

    /// Moves up to `max` queued records into `batch`.
    pub(crate) fn take(&self, batch: &mut Vec<Utf8Bytes>, max: usize) {
        let mut queue = self.queue();
        let n = queue.len().min(max);
        batch.extend(queue.drain(..n));
        if queue.is_empty() && queue.capacity() > 64 {
            // Give back what a burst grew, so idle connections stay small.
            queue.shrink_to_fit();
        }
    }

    /// Takes the oldest queued record.
    pub(crate) fn pop(&self) -> Option<Utf8Bytes> {
        self.queue().pop_front()
    }
}

/// The write side of one local connection.
#[derive(Debug)]
pub(crate) struct LocalConnection {
    mailbox: Arc<Mailbox>,
    groups: Vec<Arc<str>>,
}

/// What happened to one send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Sent {
    /// Queued for the socket.
    Queued,
    /// No such local connection (or it is closing).
    Gone,
    /// The connection's queue is full: the client does not read; it is being closed.
    Overflow,
}

/// Local connections and groups of this node.
#[derive(Debug, Default)]
pub(crate) struct Registry {
    connections: DashMap<ConnectionId, LocalConnection>,
    groups: DashMap<Arc<str>, HashSet<ConnectionId>>,
}

impl Registry {
    /// Registers a connection; returns its mailbox, which holds at most `capacity` records.
    pub(crate) fn insert(&self, id: ConnectionId, capacity: usize) -> Arc<Mailbox> {
        let mailbox = Arc::new(Mailbox::new(capacity));
        self.connections.insert(
            id,
            LocalConnection {
                mailbox: mailbox.clone(),
                groups: Vec::new(),
            },
        );
        mailbox
    }

    /// Unregisters a connection and takes it out of its groups.
    pub(crate) fn remove(&self, id: &ConnectionId) {
        if let Some((_, conn)) = self.connections.remove(id) {
            for group in conn.groups {
                self.groups.remove_if_mut(&group, |_, members| {
                    members.remove(id);
                    members.is_empty()
                });
            }
        }
    }

    /// Number of local connections.
    pub(crate) fn len(&self) -> usize {
        self.connections.len()
    }

    /// Queues `record` for one connection without waiting.
    pub(crate) fn send(&self, id: &ConnectionId, record: &Utf8Bytes) -> Sent {
        match self.connections.get(id) {
            Some(conn) => conn.mailbox.push(record),
            None => Sent::Gone,
        }
    }

    /// Adds a local connection to a group. Returns false if the connection is not local.
    pub(crate) fn join(&self, id: &ConnectionId, group: &str) -> bool {
        let Some(mut conn) = self.connections.get_mut(id) else {
            return false;
        };
        if conn.groups.iter().any(|g| &**g == group) {
            return true;
        }
        let name: Arc<str> = Arc::from(group);
        conn.groups.push(name.clone());
        drop(conn);
        self.groups.entry(name).or_default().insert(id.clone());
        true
    }

    /// Takes a local connection out of a group. Returns whether it was a member.
    pub(crate) fn leave(&self, id: &ConnectionId, group: &str) -> bool {
        let Some(mut conn) = self.connections.get_mut(id) else {
            return false;
        };
        let before = conn.groups.len();
        conn.groups.retain(|g| &**g != group);
        let was_member = conn.groups.len() != before;
        drop(conn);
        self.groups.remove_if_mut(group, |_, members| {
            members.remove(id);
            members.is_empty()
        });
        was_member
    }

    /// Members of a local group (a copy; the lock is released before returning).
    pub(crate) fn group_members(&self, group: &str) -> Vec<ConnectionId> {
        self.groups
            .get(group)
            .map(|m| m.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Ids of every local connection (a copy).
    pub(crate) fn all(&self) -> Vec<ConnectionId> {
        self.connections.iter().map(|e| e.key().clone()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> ConnectionId {
        ConnectionId::new(s).expect("valid")
    }

    #[test]
    fn groups_follow_their_members() {
        let registry = Registry::default();
        let _a = registry.insert(id("a"), 4);
        let _b = registry.insert(id("b"), 4);
        assert!(registry.join(&id("a"), "room"));
        assert!(registry.join(&id("b"), "room"));
        assert!(registry.join(&id("b"), "room"), "joining twice is harmless");
        assert!(
            !registry.join(&id("zz"), "room"),
            "unknown connections cannot join"
        );
        let mut members = registry.group_members("room");
        members.sort();
        assert_eq!(members, [id("a"), id("b")]);
        registry.remove(&id("a"));
        assert_eq!(registry.group_members("room"), [id("b")]);
        assert!(registry.leave(&id("b"), "room"));
        assert!(registry.group_members("room").is_empty());
        assert!(registry.groups.is_empty(), "empty groups are deleted");
    }

    #[test]
    fn records_queue_in_order_and_come_out_in_batches() {
        let registry = Registry::default();
        let mailbox = registry.insert(id("a"), 8);
        for text in ["1", "2", "3"] {
            assert_eq!(
                registry.send(&id("a"), &Utf8Bytes::from_static(text)),
                Sent::Queued
            );
        }
        assert_eq!(
            futures_util::FutureExt::now_or_never(mailbox.ready()),
            Some(MailboxEvent::Ready)
        );
        let mut batch = Vec::new();
        mailbox.take(&mut batch, 2);
        assert_eq!(batch, ["1", "2"]);
        assert_eq!(mailbox.pop().as_deref(), Some("3"));
        assert_eq!(mailbox.pop(), None);
        assert_eq!(
            registry.send(&id("nobody"), &Utf8Bytes::from_static("x")),
            Sent::Gone
        );
    }

    #[test]
    fn a_full_queue_reports_overflow_and_wakes_the_session() {
        let registry = Registry::default();
        let mailbox = registry.insert(id("a"), 1);
        let record = Utf8Bytes::from_static("{}\u{1e}");
        assert_eq!(registry.send(&id("a"), &record), Sent::Queued);
        assert_eq!(registry.send(&id("a"), &record), Sent::Overflow);
        assert_eq!(
            futures_util::FutureExt::now_or_never(mailbox.ready()),
            Some(MailboxEvent::Overflowed)
        );
    }

    #[tokio::test]
    async fn a_waiting_session_is_woken_by_a_send() {
        let registry = Arc::new(Registry::default());
        let mailbox = registry.insert(id("a"), 4);
        let waiter = tokio::spawn(async move { mailbox.ready().await });
        tokio::task::yield_now().await;
        assert_eq!(
            registry.send(&id("a"), &Utf8Bytes::from_static("x")),
            Sent::Queued
        );
        assert_eq!(waiter.await.expect("no panic"), MailboxEvent::Ready);
    }
}
