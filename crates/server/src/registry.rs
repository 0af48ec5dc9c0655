//! The node's own live sockets: connection id → outgoing queue, and local groups.
//!
//! This is not the [`ConnectionStore`](switchboard_core::ConnectionStore): the store says which
//! connections a user has anywhere; the registry holds the write ends of the sockets this node
//! serves.

use std::collections::HashSet;
use std::sync::Arc;

use axum::extract::ws::Utf8Bytes;
use dashmap::DashMap;
use switchboard_core::ConnectionId;
use tokio::sync::{Notify, mpsc};

/// What a session is told to write.
#[derive(Debug, Clone)]
pub(crate) enum Outgoing {
    /// One whole serialized record, shared between all recipients of a fan-out.
    Record(Utf8Bytes),
}

/// The write side of one local connection.
#[derive(Debug)]
pub(crate) struct LocalConnection {
    tx: mpsc::Sender<Outgoing>,
    /// Woken when the connection must be closed because its queue overflowed.
    overflow: Arc<Notify>,
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
    /// Registers a connection; returns the receiving end of its queue and its overflow signal.
    pub(crate) fn insert(
        &self,
        id: ConnectionId,
        capacity: usize,
    ) -> (mpsc::Receiver<Outgoing>, Arc<Notify>) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let overflow = Arc::new(Notify::new());
        self.connections.insert(
            id,
            LocalConnection {
                tx,
                overflow: overflow.clone(),
                groups: Vec::new(),
            },
        );
        (rx, overflow)
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
    pub(crate) fn send(&self, id: &ConnectionId, record: &Outgoing) -> Sent {
        let Some(conn) = self.connections.get(id) else {
            return Sent::Gone;
        };
        match conn.tx.try_send(record.clone()) {
            Ok(()) => Sent::Queued,
            Err(mpsc::error::TrySendError::Full(_)) => {
                conn.overflow.notify_one();
                Sent::Overflow
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Sent::Gone,
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
        let (_rx1, _) = registry.insert(id("a"), 4);
        let (_rx2, _) = registry.insert(id("b"), 4);
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
    fn a_full_queue_reports_overflow_and_signals_it() {
        let registry = Registry::default();
        let (_rx, overflow) = registry.insert(id("a"), 1);
        let record = Outgoing::Record(Utf8Bytes::from_static("{}\u{1e}"));
        assert_eq!(registry.send(&id("a"), &record), Sent::Queued);
        assert_eq!(registry.send(&id("a"), &record), Sent::Overflow);
        let notified = overflow.notified();
        tokio::pin!(notified);
        // notify_one stored a permit, so the future completes at once.
        assert!(
            futures_util::FutureExt::now_or_never(notified).is_some(),
            "overflow must wake the session"
        );
        assert_eq!(registry.send(&id("nobody"), &record), Sent::Gone);
    }
}
