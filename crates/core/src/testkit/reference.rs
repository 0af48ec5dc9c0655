use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;

use crate::{
    Capabilities, ConnectionId, ConnectionRecord, ConnectionStore, Counts, Lease, NodeId,
    OrphanCleanup, PageRequest, Removal, Speed, StoreError, UserId, UserListing, UserPage,
};

#[derive(Debug, Default)]
struct State {
    users: BTreeMap<UserId, BTreeMap<ConnectionId, ConnectionRecord>>,
    leases: BTreeMap<NodeId, Instant>,
}

impl State {
    /// Whether lookups show `record`: its node holds a live lease, or never took one (records
    /// of a node that never took a lease stay until a sweep removes them).
    fn visible(&self, record: &ConnectionRecord, now: Instant) -> bool {
        self.leases
            .get(record.node())
            .is_none_or(|expires| *expires > now)
    }

    /// The users with at least one visible connection, each with their visible connections.
    fn visible_users(
        &self,
        now: Instant,
    ) -> impl Iterator<Item = (&UserId, Vec<&ConnectionRecord>)> + '_ {
        self.users.iter().filter_map(move |(user, conns)| {
            let live: Vec<&ConnectionRecord> =
                conns.values().filter(|r| self.visible(r, now)).collect();
            (!live.is_empty()).then_some((user, live))
        })
    }
}

/// The conformance suite's model as a store: one mutex around ordered maps.
///
/// Obviously correct and deliberately simple; use it as a fake in unit tests, not in servers.
/// Single process only, lists users by index, supports node leases on the process clock
/// (lookups skip the records of nodes whose lease expired).
#[derive(Debug, Default)]
pub struct ReferenceStore {
    state: Mutex<State>,
}

impl ReferenceStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the maps half-updated in a way that matters
        // for a test fake; keep going with the data.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[async_trait]
impl ConnectionStore for ReferenceStore {
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            strategy: "reference",
            shared_across_nodes: false,
            spans_nodes_with_backplane: false,
            lookup: true,
            list_users: UserListing::Indexed,
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
        Ok(if removed {
            Removal::Removed
        } else {
            Removal::NotFound
        })
    }

    async fn reconnect(&self, record: ConnectionRecord) -> Result<(), StoreError> {
        let mut state = self.state();
        state
            .users
            .entry(record.user().clone())
            .or_default()
            .insert(record.id().clone(), record);
        Ok(())
    }

    async fn connections(&self, user: &UserId) -> Result<Vec<ConnectionRecord>, StoreError> {
        let now = Instant::now();
        let state = self.state();
        Ok(state
            .users
            .get(user)
            .map(|conns| {
                conns
                    .values()
                    .filter(|r| state.visible(r, now))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default())
    }

    async fn users(&self, page: PageRequest) -> Result<UserPage, StoreError> {
        let now = Instant::now();
        let state = self.state();
        let limit = page.effective_limit();
        let after = match &page.after {
            Some(after) => std::ops::Bound::Excluded(after),
            None => std::ops::Bound::Unbounded,
        };
        let mut users: Vec<UserId> = state
            .users
            .range::<UserId, _>((after, std::ops::Bound::Unbounded))
            .skip_while(|(u, _)| page.prefix().is_some_and(|p| u.as_str() < p))
            .take_while(|(u, _)| page.prefix().is_none_or(|p| u.as_str().starts_with(p)))
            .filter(|(_, conns)| conns.values().any(|r| state.visible(r, now)))
            .map(|(u, _)| u.clone())
            .take(limit + 1)
            .collect();
        let more = users.len() > limit;
        users.truncate(limit);
        let next = if more { users.last().cloned() } else { None };
        Ok(UserPage { users, next })
    }

    async fn counts(&self) -> Result<Counts, StoreError> {
        let now = Instant::now();
        let state = self.state();
        let mut counts = Counts::default();
        for (_, live) in state.visible_users(now) {
            counts.users += 1;
            counts.connections += live.len() as u64;
        }
        Ok(counts)
    }

    async fn counts_by_node(&self) -> Result<BTreeMap<NodeId, u64>, StoreError> {
        let now = Instant::now();
        let state = self.state();
        let mut counts = BTreeMap::new();
        for (_, live) in state.visible_users(now) {
            for record in live {
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
        let State { users, leases } = &mut *state;
        let mut removed = 0;
        users.retain(|_, conns| {
            conns.retain(|_, r| {
                let live = leases.get(r.node()).is_some_and(|expires| *expires > now);
                removed += u64::from(!live);
                live
            });
            !conns.is_empty()
        });
        leases.retain(|_, expires| *expires > now);
        Ok(removed)
    }

    async fn release(&self, node: &NodeId) -> Result<u64, StoreError> {
        let mut state = self.state();
        let State { users, leases } = &mut *state;
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
        Ok(removed)
    }
}
