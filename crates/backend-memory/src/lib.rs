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
//!
//! ## Node leases
//!
//! The store has node leases on the process clock, so several logical nodes in one process
//! (tests, embedded setups) behave like nodes sharing a database: lookups and counts skip the
//! records of a node whose lease expired, and a sweep removes them. A sweep checks each
//! record's lease under that user's shard lock as it removes it, so a node that renews during
//! a sweep keeps what it records after renewing. Leases change rarely, so they sit behind one
//! lock, with the earliest expiry copied into an atomic: while no lease has expired, lookups
//! and counts read that atomic (and the clock, once some node holds a lease) and nothing else.
//!
//! ## What it shares between threads
//!
//! Two threads only meet on a lock when they touch users in the same shard of the map, so the
//! map has at least 64 shards (more than `DashMap`'s default of 4 per core). The connection
//! count is split into per-thread stripes, so counting does not make every connect and
//! disconnect fight over one cache line.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{OnceLock, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use dashmap::DashMap;
use switchboard_core::{
    Capabilities, ConnectionId, ConnectionRecord, ConnectionStore, Counts, Lease, NodeId,
    OrphanCleanup, PageRequest, Removal, Speed, StoreError, UserId, UserListing, UserPage,
};

/// The in-memory connection store. See the [crate docs](crate) for its limits.
///
/// Node leases ([`ConnectionStore::heartbeat`], [`ConnectionStore::sweep`],
/// [`ConnectionStore::release`]) are supported so that several logical nodes in one process
/// (tests, embedded setups) behave like nodes sharing an external store. Lookups and counts
/// skip the records of nodes whose lease expired; while no lease has expired they cost one
/// atomic load more than without leases (and a clock read once some node holds a lease).
#[derive(Debug)]
pub struct MemoryStore {
    /// user → that user's live connections (usually one to a handful, so a `Vec`).
    users: DashMap<UserId, Vec<ConnectionRecord>>,
    /// Live connections in all users, kept beside the map so counting does not scan. Counts
    /// records of expired nodes too, until they are swept.
    connections: StripedCounter,
    /// node → lease expiry.
    leases: Leases,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::with_capacity(0)
    }
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty store with room for `users` users before it grows.
    pub fn with_capacity(users: usize) -> Self {
        Self {
            users: DashMap::with_capacity_and_shard_amount(users, user_shards()),
            connections: StripedCounter::new(),
            leases: Leases::new(),
        }
    }

    /// The capabilities of every `MemoryStore`.
    pub const CAPABILITIES: Capabilities = Capabilities {
        strategy: "memory",
        shared_across_nodes: false,
        spans_nodes_with_backplane: false,
        lookup: true,
        list_users: UserListing::FullScan,
        survives_restart: false,
        speed: Speed::InProcess,
        orphan_cleanup: OrphanCleanup::DiesWithNode,
        leases: true,
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
        self.connections.add(1);
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
            self.connections.sub(1);
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
                self.connections.add(1);
            }
        }
        Ok(())
    }

    async fn connections(&self, user: &UserId) -> Result<Vec<ConnectionRecord>, StoreError> {
        let expired = self.leases.expired();
        // Copy the answer and drop the shard guard before returning.
        Ok(self
            .users
            .get(user)
            .map(|conns| match &expired {
                None => conns.to_vec(),
                Some(expired) => conns.iter().filter(|r| expired.shows(r)).cloned().collect(),
            })
            .unwrap_or_default())
    }

    async fn users(&self, page: PageRequest) -> Result<UserPage, StoreError> {
        Ok(match self.leases.expired() {
            None => page.select(self.users.iter().map(|e| e.key().clone())),
            Some(expired) => page.select(
                self.users
                    .iter()
                    .filter(|e| e.value().iter().any(|r| expired.shows(r)))
                    .map(|e| e.key().clone()),
            ),
        })
    }

    async fn counts(&self) -> Result<Counts, StoreError> {
        let Some(expired) = self.leases.expired() else {
            return Ok(Counts {
                users: self.users.len() as u64,
                connections: self.connections.get(),
            });
        };
        // Some node's lease ran out and was not swept yet: count what lookups show.
        let mut counts = Counts::default();
        for entry in &self.users {
            let live = entry.value().iter().filter(|r| expired.shows(r)).count() as u64;
            counts.users += u64::from(live > 0);
            counts.connections += live;
        }
        Ok(counts)
    }

    async fn counts_by_node(&self) -> Result<BTreeMap<NodeId, u64>, StoreError> {
        let expired = self.leases.expired();
        let mut counts = BTreeMap::new();
        for entry in &self.users {
            for record in entry.value() {
                if expired.as_ref().is_none_or(|expired| expired.shows(record)) {
                    *counts.entry(record.node().clone()).or_insert(0) += 1;
                }
            }
        }
        Ok(counts)
    }

    async fn heartbeat(&self, node: &NodeId, ttl: Duration) -> Result<Lease, StoreError> {
        Ok(self.leases.renew(node, ttl))
    }

    async fn sweep(&self) -> Result<u64, StoreError> {
        let now = Instant::now();
        let mut removed = 0;
        self.users.retain(|_, conns| {
            // Read the lease table for each user, under that user's shard lock: a node that
            // renewed since the sweep began keeps the records it wrote since.
            let leases = self.leases.read();
            let before = conns.len();
            conns.retain(|r| leases.get(r.node()).is_some_and(|expires| *expires > now));
            removed += before - conns.len();
            !conns.is_empty()
        });
        self.connections.sub(removed);
        self.leases.forget_expired(now);
        Ok(removed as u64)
    }

    async fn release(&self, node: &NodeId) -> Result<u64, StoreError> {
        self.leases.end(node);
        let mut removed = 0;
        self.users.retain(|_, conns| {
            let before = conns.len();
            conns.retain(|r| r.node() != node);
            removed += before - conns.len();
            !conns.is_empty()
        });
        self.connections.sub(removed);
        Ok(removed as u64)
    }
}

/// The node leases of a [`MemoryStore`], on the process clock.
///
/// Beside the table it keeps the earliest expiry in an atomic, so that a lookup learns from
/// one load (and, once some node holds a lease, one clock read) that no lease has expired, and
/// then skips all filtering. Leases change rarely (a heartbeat per node every few seconds), so
/// the table is a plain lock; lookups only read it while some expired lease awaits a sweep.
#[derive(Debug)]
struct Leases {
    /// node → lease expiry.
    table: RwLock<HashMap<NodeId, Instant>>,
    /// The earliest expiry in `table` in nanoseconds after `epoch`, or [`NO_LEASE`] while the
    /// table is empty. Only written under the table's write lock, right after a change.
    earliest: AtomicU64,
    /// What `earliest` counts from: when the store was made.
    epoch: Instant,
}

/// [`Leases::earliest`] while no node holds a lease.
const NO_LEASE: u64 = u64::MAX;

/// The nodes whose lease had expired when a lookup began; lookups skip their records.
#[derive(Debug)]
struct Expired(Vec<NodeId>);

impl Expired {
    /// Whether lookups show `record`.
    fn shows(&self, record: &ConnectionRecord) -> bool {
        !self.0.contains(record.node())
    }
}

impl Leases {
    fn new() -> Self {
        Self {
            table: RwLock::new(HashMap::new()),
            earliest: AtomicU64::new(NO_LEASE),
            epoch: Instant::now(),
        }
    }

    fn read(&self) -> RwLockReadGuard<'_, HashMap<NodeId, Instant>> {
        // Every change leaves the table whole before it could panic; keep going.
        self.table.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> RwLockWriteGuard<'_, HashMap<NodeId, Instant>> {
        self.table.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// `at` as nanoseconds after the epoch (saturating: a lease centuries away never expires).
    fn nanos(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX - 1)
    }

    /// Stores the earliest expiry of `table`. Called with the write lock held.
    fn publish(&self, table: &HashMap<NodeId, Instant>) {
        let earliest = table
            .values()
            .map(|expires| self.nanos(*expires))
            .min()
            .unwrap_or(NO_LEASE);
        self.earliest.store(earliest, Ordering::Release);
    }

    /// The nodes whose lease has expired, or `None` when none has (the fast path: no lock).
    fn expired(&self) -> Option<Expired> {
        let earliest = self.earliest.load(Ordering::Acquire);
        if earliest == NO_LEASE {
            return None;
        }
        let now = Instant::now();
        if self.nanos(now) < earliest {
            return None;
        }
        let expired: Vec<NodeId> = self
            .read()
            .iter()
            .filter(|(_, expires)| **expires <= now)
            .map(|(node, _)| node.clone())
            .collect();
        (!expired.is_empty()).then_some(Expired(expired))
    }

    /// Takes or renews the lease of `node` for `ttl` from now.
    fn renew(&self, node: &NodeId, ttl: Duration) -> Lease {
        let mut table = self.write();
        let now = Instant::now();
        let expires = now + ttl.min(Lease::MAX_TTL);
        let previous = table.insert(node.clone(), expires);
        self.publish(&table);
        match previous {
            None => Lease::Taken,
            Some(expires) if expires > now => Lease::Renewed,
            Some(_) => Lease::Lapsed,
        }
    }

    /// Ends the lease of `node`, if it holds one.
    fn end(&self, node: &NodeId) {
        let mut table = self.write();
        if table.remove(node).is_some() {
            self.publish(&table);
        }
    }

    /// Forgets the leases that expired by `now` (a lease renewed since stays).
    fn forget_expired(&self, now: Instant) {
        let mut table = self.write();
        table.retain(|_, expires| *expires > now);
        self.publish(&table);
    }
}

/// Shards of the user map: DashMap's default (4 per core, rounded up to a power of two), but
/// at least 64. Two threads working on random users meet on a shard lock 1 time in 64 instead
/// of 1 in 8 on a two-core machine; the cost is a few kilobytes per store.
fn user_shards() -> usize {
    static SHARDS: OnceLock<usize> = OnceLock::new();
    *SHARDS.get_or_init(|| {
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        (cores * 4).next_power_of_two().max(64)
    })
}

/// A count split over stripes, one cache line each. A thread always adds to the same stripe
/// (threads are dealt stripes in turn), so threads counting at the same time rarely write the
/// same cache line; reading sums the stripes.
#[derive(Debug)]
struct StripedCounter {
    stripes: Box<[Stripe]>,
}

/// One stripe of a [`StripedCounter`], alone on its cache line (128 bytes also keeps it apart
/// from the line the CPU prefetches next to it). A stripe can go below zero when a connection
/// is counted in on one thread's stripe and out on another's; only the sum means anything.
#[derive(Debug, Default)]
#[repr(align(128))]
struct Stripe(AtomicI64);

impl StripedCounter {
    const STRIPES: usize = 16;

    fn new() -> Self {
        Self {
            stripes: (0..Self::STRIPES).map(|_| Stripe::default()).collect(),
        }
    }

    fn stripe(&self) -> &AtomicI64 {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        thread_local! {
            static MINE: usize = NEXT.fetch_add(1, Ordering::Relaxed);
        }
        // During thread-local teardown, any stripe will do.
        let mine = MINE.try_with(|i| *i).unwrap_or(0);
        &self.stripes[mine % self.stripes.len()].0
    }

    fn add(&self, n: usize) {
        self.stripe()
            .fetch_add(i64::try_from(n).unwrap_or(i64::MAX), Ordering::Relaxed);
    }

    fn sub(&self, n: usize) {
        self.stripe()
            .fetch_sub(i64::try_from(n).unwrap_or(i64::MAX), Ordering::Relaxed);
    }

    /// The sum of the stripes: exact when no update is under way; while updates run it can be
    /// off by the updates in flight (as a single counter could), and it never goes below 0.
    fn get(&self) -> u64 {
        let sum = self.stripes.iter().fold(0_i64, |sum, s| {
            sum.wrapping_add(s.0.load(Ordering::Relaxed))
        });
        u64::try_from(sum).unwrap_or(0)
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

    #[test]
    fn striped_counter_sums_every_thread() {
        let counter = StripedCounter::new();
        std::thread::scope(|s| {
            for _ in 0..(StripedCounter::STRIPES + 3) {
                s.spawn(|| {
                    for _ in 0..1000 {
                        counter.add(1);
                    }
                    counter.sub(400);
                });
            }
        });
        assert_eq!(counter.get(), 600 * (StripedCounter::STRIPES as u64 + 3));

        // Counted in on one thread's stripe, out on another's: the sum is still right.
        let counter = StripedCounter::new();
        counter.add(2);
        std::thread::scope(|s| {
            s.spawn(|| counter.sub(1));
        });
        assert_eq!(counter.get(), 1);
        counter.sub(5);
        assert_eq!(counter.get(), 0, "a sum below zero reads as zero");
    }
}
