//! The baseline the store benchmarks measure [`MemoryStore`](switchboard_memory::MemoryStore)
//! against: the classic in-memory sample's design, made correct.
//!
//! One global [`std::sync::Mutex`] around `HashMap<UserId, HashMap<ConnectionId,
//! ConnectionRecord>>`: every operation on every user takes the same lock, and each step of an
//! operation happens under it, so this store has none of the classic sample's races (its
//! lookups copy, and removing the last connection deletes the user under the same lock). What
//! it lacks is parallelism: two threads never work on the map at the same time.

use std::collections::{HashMap, HashSet};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::SystemTime;

use async_trait::async_trait;
use switchboard_core::{
    Capabilities, ConnectionId, ConnectionRecord, ConnectionStore, Counts, NodeId, OrphanCleanup,
    PageRequest, Removal, Speed, StoreError, UserId, UserListing, UserPage,
};

/// Everything the store holds, behind its one lock.
#[derive(Debug, Default)]
struct State {
    /// user → that user's live connections.
    users: HashMap<UserId, HashMap<ConnectionId, ConnectionRecord>>,
    /// Live connections in all users.
    connections: u64,
    /// node → lease expiry.
    leases: HashMap<NodeId, SystemTime>,
}

/// One process, one global lock; supports everything [`MemoryStore`] does, with the same
/// capabilities.
///
/// [`MemoryStore`]: switchboard_memory::MemoryStore
#[derive(Debug, Default)]
pub struct GlobalMutexStore {
    state: Mutex<State>,
}

impl GlobalMutexStore {
    /// An empty store with room for `users` users before it grows.
    pub fn with_capacity(users: usize) -> Self {
        Self {
            state: Mutex::new(State {
                users: HashMap::with_capacity(users),
                ..State::default()
            }),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // Every operation leaves the maps consistent before it can panic; keep going.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[async_trait]
impl ConnectionStore for GlobalMutexStore {
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            strategy: "global-mutex",
            shared_across_nodes: false,
            lookup: true,
            list_users: UserListing::FullScan,
            survives_restart: false,
            speed: Speed::InProcess,
            orphan_cleanup: OrphanCleanup::LeaseSweep,
        }
    }

    async fn add(&self, record: ConnectionRecord) -> Result<(), StoreError> {
        let mut state = self.state();
        let conns = state.users.entry(record.user().clone()).or_default();
        if conns.contains_key(record.id()) {
            return Err(StoreError::Conflict {
                user: record.user().clone(),
                id: record.id().clone(),
            });
        }
        conns.insert(record.id().clone(), record);
        state.connections += 1;
        Ok(())
    }

    async fn remove(&self, user: &UserId, id: &ConnectionId) -> Result<Removal, StoreError> {
        let mut state = self.state();
        let Some(conns) = state.users.get_mut(user) else {
            return Ok(Removal::NotFound);
        };
        let removed = conns.remove(id).is_some();
        if conns.is_empty() {
            state.users.remove(user);
        }
        if removed {
            state.connections -= 1;
            Ok(Removal::Removed)
        } else {
            Ok(Removal::NotFound)
        }
    }

    async fn reconnect(&self, record: ConnectionRecord) -> Result<(), StoreError> {
        let mut state = self.state();
        let conns = state.users.entry(record.user().clone()).or_default();
        if conns.insert(record.id().clone(), record).is_none() {
            state.connections += 1;
        }
        Ok(())
    }

    async fn connections(&self, user: &UserId) -> Result<Vec<ConnectionRecord>, StoreError> {
        Ok(self
            .state()
            .users
            .get(user)
            .map(|conns| conns.values().cloned().collect())
            .unwrap_or_default())
    }

    async fn users(&self, page: PageRequest) -> Result<UserPage, StoreError> {
        Ok(page.select(self.state().users.keys().cloned()))
    }

    async fn counts(&self) -> Result<Counts, StoreError> {
        let state = self.state();
        Ok(Counts {
            users: state.users.len() as u64,
            connections: state.connections,
        })
    }

    async fn heartbeat(&self, node: &NodeId, expires_at: SystemTime) -> Result<(), StoreError> {
        self.state().leases.insert(node.clone(), expires_at);
        Ok(())
    }

    async fn sweep(&self, now: SystemTime) -> Result<Vec<ConnectionRecord>, StoreError> {
        let mut state = self.state();
        let State {
            users,
            connections,
            leases,
        } = &mut *state;
        leases.retain(|_, expires| *expires > now);
        let live: HashSet<&NodeId> = leases.keys().collect();
        let mut removed = Vec::new();
        users.retain(|_, conns| {
            conns.retain(|_, r| {
                let keep = live.contains(r.node());
                if !keep {
                    removed.push(r.clone());
                }
                keep
            });
            !conns.is_empty()
        });
        *connections -= removed.len() as u64;
        Ok(removed)
    }
}
