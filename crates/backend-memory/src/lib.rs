//! # switchboard-memory
//!
//! [`MemoryStore`]: the in-memory user → connections map, the fastest
//! [`ConnectionStore`].
//!
//! **One node only.** Records live in this process: other servers cannot see them, and they are
//! gone when the process stops (so a crash leaves no orphans behind). Users can be listed, at
//! the cost of a scan over all users per page. Every operation is a few hundred nanoseconds and
//! never waits for I/O. Use it for a single server, for development and in tests; for several
//! servers pick a shared store (`sql`, `azure`) or the `groups` strategy.
//!
//! ## How it avoids the classic races
//!
//! The classic sample keeps a `Dictionary<user, HashSet<connection>>` and has two races:
//! its lookup hands out the live set without a lock (callers iterate a set other threads are
//! changing), and "remove the connection, then delete the user if the set is empty" done in two
//! steps can drop a connection added in between. Here:
//!
//! * The map is a [`DashMap`] keyed by user; each user's connections live *inside* the map
//!   entry, so every change to a user happens under that user's shard lock, in one step.
//! * Removing the last connection deletes the user under the same lock
//!   ([`DashMap::remove_if_mut`]), so a concurrent add either lands before (and keeps the user)
//!   or after (and re-creates it).
//! * Lookups copy the answer (a few reference-counted records) and release the lock before
//!   returning; no lock is ever held across an `.await`.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use async_trait::async_trait;
use dashmap::DashMap;
use switchboard_core::{
    Capabilities, ConnectionId, ConnectionRecord, ConnectionStore, Counts, NodeId, OrphanCleanup,
    PageRequest, Removal, Speed, StoreError, UserId, UserListing, UserPage,
};

/// The in-memory connection store. See the [crate docs](crate) for its limits.
///
/// Node leases ([`ConnectionStore::heartbeat`] / [`ConnectionStore::sweep`]) are supported so
/// that several logical nodes in one process (tests, embedded setups) behave like nodes sharing
/// an external store; a lone server pays nothing for them.
#[derive(Debug, Default)]
pub struct MemoryStore {
    /// user → that user's live connections (usually one to a handful, so a `Vec`).
    users: DashMap<UserId, Vec<ConnectionRecord>>,
    /// Live connections in all users, kept beside the map so counting does not scan.
    connections: AtomicU64,
    /// node → lease expiry.
    leases: DashMap<NodeId, SystemTime>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty store with room for `users` users before it grows.
    pub fn with_capacity(users: usize) -> Self {
        Self {
            users: DashMap::with_capacity(users),
            ..Self::default()
        }
    }

    /// The capabilities of every `MemoryStore`.
    pub const CAPABILITIES: Capabilities = Capabilities {
        strategy: "memory",
        shared_across_nodes: false,
        lookup: true,
        list_users: UserListing::FullScan,
        survives_restart: false,
        speed: Speed::InProcess,
        orphan_cleanup: OrphanCleanup::LeaseSweep,
    };
}

#[async_trait]
impl ConnectionStore for MemoryStore {
    fn capabilities(&self) -> Capabilities {
        Self::CAPABILITIES
    }

    async fn add(&self, record: ConnectionRecord) -> Result<(), StoreError> {
        let mut conns = self.users.entry(record.user().clone()).or_default();
        if conns.iter().any(|r| r.id() == record.id()) {
            return Err(StoreError::Conflict {
                user: record.user().clone(),
                id: record.id().clone(),
            });
        }
        conns.push(record);
        drop(conns);
        self.connections.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    async fn remove(&self, user: &UserId, id: &ConnectionId) -> Result<Removal, StoreError> {
        let mut removed = false;
        // One shard lock for both steps: remove the connection, and the user if it was the last.
        self.users.remove_if_mut(user, |_, conns| {
            if let Some(i) = conns.iter().position(|r| r.id() == id) {
                conns.swap_remove(i);
                removed = true;
            }
            conns.is_empty()
        });
        if removed {
            self.connections.fetch_sub(1, Ordering::Relaxed);
            Ok(Removal::Removed)
        } else {
            Ok(Removal::NotFound)
        }
    }

    async fn reconnect(&self, record: ConnectionRecord) -> Result<(), StoreError> {
        let mut conns = self.users.entry(record.user().clone()).or_default();
        match conns.iter_mut().find(|r| r.id() == record.id()) {
            Some(existing) => *existing = record,
            None => {
                conns.push(record);
                drop(conns);
                self.connections.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(())
    }

    async fn connections(&self, user: &UserId) -> Result<Vec<ConnectionRecord>, StoreError> {
        // Copy the answer and drop the shard guard before returning.
        Ok(self
            .users
            .get(user)
            .map(|conns| conns.to_vec())
            .unwrap_or_default())
    }

    async fn users(&self, page: PageRequest) -> Result<UserPage, StoreError> {
        let limit = page.effective_limit();
        let mut users: Vec<UserId> = self
            .users
            .iter()
            .filter(|e| page.after.as_ref().is_none_or(|after| e.key() > after))
            .map(|e| e.key().clone())
            .collect();
        let more = users.len() > limit;
        if more {
            // The `limit` smallest ids, without sorting the whole scan.
            users.select_nth_unstable(limit);
            users.truncate(limit);
        }
        users.sort_unstable();
        let next = if more { users.last().cloned() } else { None };
        Ok(UserPage { users, next })
    }

    async fn counts(&self) -> Result<Counts, StoreError> {
        Ok(Counts {
            users: self.users.len() as u64,
            connections: self.connections.load(Ordering::Relaxed),
        })
    }

    async fn heartbeat(&self, node: &NodeId, expires_at: SystemTime) -> Result<(), StoreError> {
        self.leases.insert(node.clone(), expires_at);
        Ok(())
    }

    async fn sweep(&self, now: SystemTime) -> Result<Vec<ConnectionRecord>, StoreError> {
        self.leases.retain(|_, expires| *expires > now);
        let live: HashSet<NodeId> = self.leases.iter().map(|e| e.key().clone()).collect();
        let mut removed = Vec::new();
        self.users.retain(|_, conns| {
            conns.retain(|r| {
                let keep = live.contains(r.node());
                if !keep {
                    removed.push(r.clone());
                }
                keep
            });
            !conns.is_empty()
        });
        self.connections
            .fetch_sub(removed.len() as u64, Ordering::Relaxed);
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn is_a_connection_store_object() {
        let store: Arc<dyn ConnectionStore> = Arc::new(MemoryStore::new());
        assert_eq!(store.capabilities(), MemoryStore::CAPABILITIES);
    }
}
