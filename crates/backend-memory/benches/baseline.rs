//! The baseline the store benchmarks measure [`MemoryStore`](switchboard_memory::MemoryStore)
//! against: the classic in-memory sample's design, made correct.
//!
//! One global [`std::sync::Mutex`] around `HashMap<UserId, HashMap<ConnectionId,
//! ConnectionRecord>>`: every operation on every user takes the same lock, and each step of an
//! operation happens under it, so this store has none of the classic sample's races (its
//! lookups copy, and removing the last connection deletes the user under the same lock). What
//! it lacks is parallelism: two threads never work on the map at the same time.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use switchboard_core::{
    Capabilities, ConnectionId, ConnectionRecord, ConnectionStore, Counts, Lease, NodeId,
    OrphanCleanup, PageRequest, Removal, Speed, StoreError, UserId, UserListing, UserPage,
};

/// Everything the store holds, behind its one lock.
#[derive(Debug, Default)]
struct State {
    /// user → that user's live connections.
    users: HashMap<UserId, HashMap<ConnectionId, ConnectionRecord>>,
    /// Live connections in all users.
    connections: u64,
    /// node → lease expiry.
    leases: HashMap<NodeId, Instant>,
}

impl State {
    /// Nodes whose lease has expired by `now` (and was not swept yet): lookups skip their
    /// records. Without leases, or while all are live, this is empty and costs no clock read.
    fn expired(&self) -> Vec<&NodeId> {
        if self.leases.is_empty() {
            return Vec::new();
        }
        let now = Instant::now();
        self.leases
            .iter()
            .filter(|(_, expires)| **expires <= now)
            .map(|(node, _)| node)
            .collect()
    }
}

/// Whether `record` is visible to lookups, given the nodes whose lease expired.
fn visible(expired: &[&NodeId], record: &ConnectionRecord) -> bool {
    !expired.contains(&record.node())
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
            spans_nodes_with_backplane: false,
            lookup: true,
            list_users: UserListing::FullScan,
            survives_restart: false,
            speed: Speed::InProcess,
            orphan_cleanup: OrphanCleanup::DiesWithNode,
            leases: true,
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
        let state = self.state();
        let expired = state.expired();
        Ok(state
            .users
            .get(user)
            .map(|conns| {
                conns
                    .values()
                    .filter(|r| visible(&expired, r))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default())
    }

    async fn users(&self, page: PageRequest) -> Result<UserPage, StoreError> {
        let state = self.state();
        let expired = state.expired();
        Ok(page.select(
            state
                .users
                .iter()
                .filter(|(_, conns)| conns.values().any(|r| visible(&expired, r)))
                .map(|(user, _)| user.clone()),
        ))
    }

    async fn counts(&self) -> Result<Counts, StoreError> {
        let state = self.state();
        let expired = state.expired();
        if expired.is_empty() {
            return Ok(Counts {
                users: state.users.len() as u64,
                connections: state.connections,
            });
        }
        let mut counts = Counts::default();
        for conns in state.users.values() {
            let live = conns.values().filter(|r| visible(&expired, r)).count() as u64;
            counts.users += u64::from(live > 0);
            counts.connections += live;
        }
        Ok(counts)
    }

    async fn counts_by_node(&self) -> Result<std::collections::BTreeMap<NodeId, u64>, StoreError> {
        let state = self.state();
        let expired = state.expired();
        let mut counts = std::collections::BTreeMap::new();
        for record in state.users.values().flat_map(|conns| conns.values()) {
            if visible(&expired, record) {
                *counts.entry(record.node().clone()).or_insert(0) += 1;
            }
        }
        Ok(counts)
    }

    async fn heartbeat(&self, node: &NodeId, ttl: Duration) -> Result<Lease, StoreError> {
        let now = Instant::now();
        let previous = self
            .state()
            .leases
            .insert(node.clone(), now + ttl.min(Lease::MAX_TTL));
        Ok(match previous {
            None => Lease::Taken,
            Some(expires) if expires > now => Lease::Renewed,
            Some(_) => Lease::Lapsed,
        })
    }

    async fn sweep(&self) -> Result<u64, StoreError> {
        let now = Instant::now();
        let mut state = self.state();
        let State {
            users,
            connections,
            leases,
        } = &mut *state;
        let mut removed = 0;
        // Under the one lock, so no lease changes while the records are checked.
        users.retain(|_, conns| {
            conns.retain(|_, r| {
                let live = leases.get(r.node()).is_some_and(|expires| *expires > now);
                removed += u64::from(!live);
                live
            });
            !conns.is_empty()
        });
        leases.retain(|_, expires| *expires > now);
        *connections -= removed;
        Ok(removed)
    }

    async fn release(&self, node: &NodeId) -> Result<u64, StoreError> {
        let mut state = self.state();
        let State {
            users,
            connections,
            leases,
        } = &mut *state;
        leases.remove(node);
        let mut removed = 0;
        users.retain(|_, conns| {
            conns.retain(|_, r| {
                let mine = r.node() == node;
                removed += u64::from(mine);
                !mine
            });
            !conns.is_empty()
        });
        *connections -= removed;
        Ok(removed)
    }
}
