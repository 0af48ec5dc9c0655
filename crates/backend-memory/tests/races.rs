//! The races of the classic in-memory user → connections sample, caught on small naive
//! re-creations of its designs, and the same checks passed by [`MemoryStore`].
//!
//! The classic sample keeps a `Dictionary<user, HashSet<connection>>` and has two races:
//!
//! * **(a) Live answers.** Its lookup hands out the live per-user set without its lock, so a
//!   caller sees the set change while it holds it. The chat hub checks "the user has
//!   connections", then iterates the set and finds none: the message is silently dropped.
//!   [`LiveViewStore`] re-creates this: its lookup returns the shared
//!   `Arc<Mutex<HashSet<ConnectionId>>>` itself, so every read of the answer shows the store's
//!   current state (the mutex keeps it memory-safe; the answer still moves).
//! * **(b) Two-step removal.** With a lock per user set, "remove the connection; if the set is
//!   now empty, delete the user" done in two steps loses an add that lands in between: the add
//!   puts its id into a set that is then unlinked from the map. [`TwoStepStore`] re-creates
//!   this on a `DashMap<UserId, Arc<Mutex<HashSet<ConnectionId>>>>`.
//!
//! And one race of node leases, which the classic sample does not have:
//!
//! * **(c) Sweeping from a snapshot.** A sweep that first decides which nodes are live and then
//!   walks the records removes the records of a node that renewed in between and re-recorded
//!   its connections: the node was told its lease is fine, and its connections are gone.
//!   [`SnapshotSweepStore`] re-creates this.
//!
//! Each check is one function over the [`Probe`] trait, run against the naive store (where it
//! must fail, so the check cannot pass vacuously) and against [`MemoryStore`] (where it must
//! pass). Each naive store has only its own race: the deterministic check for the other race
//! passes on it, which shows each check catches the race it is named after. Nothing here is
//! timed: the multi-threaded checks are bounded by iteration counts and stop at the first
//! detection.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use dashmap::DashMap;
use switchboard_core::testkit::{conn, node, ready, t0, user};
use switchboard_core::{ConnectionId, ConnectionRecord, ConnectionStore, Counts, NodeId, UserId};
use switchboard_memory::MemoryStore;

/// Rounds per thread in the multi-threaded checks. The naive stores are caught in the first
/// round (churn) or within a few hundred (two-step removal: never more than 300 in several
/// hundred trial runs, on two cores, on one, and under extra load); `MemoryStore` runs them
/// all, well under a second in a debug build on two free cores, a few seconds on one.
const STRESS_ROUNDS: usize = 20_000;

// ---------------------------------------------------------------------------------------------
// The view the checks take of a store
// ---------------------------------------------------------------------------------------------

/// A user → connections map as the checks see it: synchronous, connection ids only.
trait Probe: Sync {
    /// Records connection `id` of `user`.
    fn connect(&self, user: &UserId, id: &ConnectionId);

    /// Removes connection `id` of `user`; nothing happens when it is not recorded.
    fn disconnect(&self, user: &UserId, id: &ConnectionId);

    /// Removes connection `id` of `user` while `during` runs concurrently. A store whose removal
    /// takes two steps runs `during` between them, the worst moment it exposes; a store whose
    /// removal is one step runs `during` on another thread at the same time.
    fn disconnect_racing(&self, user: &UserId, id: &ConnectionId, during: &(dyn Fn() + Sync));

    /// Whether a lookup of `user` currently lists `id`.
    fn is_connected(&self, user: &UserId, id: &ConnectionId) -> bool;

    /// The answer to "which connections does `user` have?", exactly as the store hands it out.
    fn lookup(&self, user: &UserId) -> Box<dyn Answer + '_>;
}

/// What a lookup handed out.
trait Answer {
    /// The connection ids the answer holds when this is called, sorted.
    fn read(&self) -> Vec<ConnectionId>;
}

/// A copied answer: holds what the store held when it was looked up.
impl Answer for Vec<ConnectionId> {
    fn read(&self) -> Vec<ConnectionId> {
        sorted(self.clone())
    }
}

/// `MemoryStore`'s answer: copied records.
impl Answer for Vec<ConnectionRecord> {
    fn read(&self) -> Vec<ConnectionId> {
        sorted(self.iter().map(|r| r.id().clone()).collect())
    }
}

/// The classic sample's answer: the store's own live set.
impl Answer for Arc<Mutex<HashSet<ConnectionId>>> {
    fn read(&self) -> Vec<ConnectionId> {
        sorted(lock(self).iter().cloned().collect())
    }
}

fn sorted(mut ids: Vec<ConnectionId>) -> Vec<ConnectionId> {
    ids.sort_unstable();
    ids
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .expect("a test thread panicked while holding this lock")
}

/// Runs `during` on another thread while `op` runs on this one, and waits for both.
fn concurrently(op: impl FnOnce(), during: &(dyn Fn() + Sync)) {
    thread::scope(|s| {
        let other = s.spawn(during);
        op();
        other.join().expect("the concurrent operation panicked");
    });
}

// ---------------------------------------------------------------------------------------------
// MemoryStore, driven without a runtime
// ---------------------------------------------------------------------------------------------

impl Probe for MemoryStore {
    fn connect(&self, user: &UserId, id: &ConnectionId) {
        let record = ConnectionRecord::new(id.clone(), user.clone(), node("n1"), t0());
        ready(self.add(record)).expect("connection ids are unique in these checks");
    }

    fn disconnect(&self, user: &UserId, id: &ConnectionId) {
        let _ = ready(self.remove(user, id)).expect("MemoryStore removal cannot fail");
    }

    fn disconnect_racing(&self, user: &UserId, id: &ConnectionId, during: &(dyn Fn() + Sync)) {
        // Removal is one step under the user's shard lock: there is no window to aim at.
        concurrently(|| self.disconnect(user, id), during);
    }

    fn is_connected(&self, user: &UserId, id: &ConnectionId) -> bool {
        self.lookup(user).read().contains(id)
    }

    fn lookup(&self, user: &UserId) -> Box<dyn Answer + '_> {
        Box::new(ready(self.connections(user)).expect("MemoryStore lookup cannot fail"))
    }
}

// ---------------------------------------------------------------------------------------------
// Naive store (a): the lookup hands out the live set
// ---------------------------------------------------------------------------------------------

/// The classic sample's lookup: one lock around the map and every change made under it, but
/// the lookup returns the live per-user set. It has race (a) only.
#[derive(Debug, Default)]
struct LiveViewStore {
    users: Mutex<HashMap<UserId, Arc<Mutex<HashSet<ConnectionId>>>>>,
}

impl Probe for LiveViewStore {
    fn connect(&self, user: &UserId, id: &ConnectionId) {
        let mut users = lock(&self.users);
        lock(users.entry(user.clone()).or_default()).insert(id.clone());
    }

    fn disconnect(&self, user: &UserId, id: &ConnectionId) {
        let mut users = lock(&self.users);
        let now_empty = users.get(user).is_some_and(|set| {
            let mut set = lock(set);
            set.remove(id);
            set.is_empty()
        });
        if now_empty {
            // Still under the map lock: removal is one step here.
            users.remove(user);
        }
    }

    fn disconnect_racing(&self, user: &UserId, id: &ConnectionId, during: &(dyn Fn() + Sync)) {
        concurrently(|| self.disconnect(user, id), during);
    }

    fn is_connected(&self, user: &UserId, id: &ConnectionId) -> bool {
        lock(&self.users)
            .get(user)
            .is_some_and(|set| lock(set).contains(id))
    }

    fn lookup(&self, user: &UserId) -> Box<dyn Answer + '_> {
        // The bug: the caller gets the store's own set, not a copy of it.
        let live = lock(&self.users).get(user).cloned().unwrap_or_default();
        Box::new(live)
    }
}

// ---------------------------------------------------------------------------------------------
// Naive store (b): "remove the connection, then the empty user" in two steps
// ---------------------------------------------------------------------------------------------

/// A map of per-user sets, each with its own lock. Removing the last connection of a user
/// unlocks the (now empty) set and only then deletes the user's key, so an add that reaches the
/// set in between is unlinked with it. Lookups copy, so it has race (b) only.
#[derive(Debug, Default)]
struct TwoStepStore {
    users: DashMap<UserId, Arc<Mutex<HashSet<ConnectionId>>>>,
    /// Called by [`Probe::disconnect`] in its window, between "the set became empty" and
    /// "remove the user's key".
    window: Option<fn()>,
}

impl TwoStepStore {
    /// A store whose removal window is as short as the code makes it.
    fn new() -> Self {
        Self::default()
    }

    /// A store whose removal calls `hook` in its window, to widen it.
    fn with_window(hook: fn()) -> Self {
        Self {
            window: Some(hook),
            ..Self::default()
        }
    }

    fn disconnect_with(&self, user: &UserId, id: &ConnectionId, in_window: &dyn Fn()) {
        // Step 0: find the user's set (the map's shard lock is released right away).
        let Some(set) = self.users.get(user).map(|entry| Arc::clone(entry.value())) else {
            return;
        };
        // Step 1: remove the connection under the set's own lock.
        let now_empty = {
            let mut set = lock(&set);
            set.remove(id);
            set.is_empty()
        };
        if now_empty {
            // The window: no lock is held, the empty set is still linked from the map.
            in_window();
            // Step 2: delete the user, whatever the set holds by now.
            self.users.remove(user);
        }
    }
}

impl Probe for TwoStepStore {
    fn connect(&self, user: &UserId, id: &ConnectionId) {
        // The shard lock is held only to find or create the set.
        let set = Arc::clone(&self.users.entry(user.clone()).or_default());
        lock(&set).insert(id.clone());
    }

    fn disconnect(&self, user: &UserId, id: &ConnectionId) {
        self.disconnect_with(user, id, &|| {
            if let Some(hook) = self.window {
                hook();
            }
        });
    }

    fn disconnect_racing(&self, user: &UserId, id: &ConnectionId, during: &(dyn Fn() + Sync)) {
        self.disconnect_with(user, id, during);
    }

    fn is_connected(&self, user: &UserId, id: &ConnectionId) -> bool {
        self.users
            .get(user)
            .is_some_and(|set| lock(set.value()).contains(id))
    }

    fn lookup(&self, user: &UserId) -> Box<dyn Answer + '_> {
        let copy: Vec<ConnectionId> = self
            .users
            .get(user)
            .map(|set| lock(set.value()).iter().cloned().collect())
            .unwrap_or_default();
        Box::new(copy)
    }
}

// ---------------------------------------------------------------------------------------------
// The checks
// ---------------------------------------------------------------------------------------------

/// A lookup answer, read again after one of its connections was removed, is unchanged.
fn answer_is_a_value(store: &dyn Probe) -> Result<(), String> {
    let alice = user("alice");
    store.connect(&alice, &conn("a1"));
    store.connect(&alice, &conn("a2"));

    let answer = store.lookup(&alice);
    let before = answer.read();
    store.disconnect(&alice, &conn("a1"));
    let after = answer.read();

    if before == after {
        Ok(())
    } else {
        Err(format!(
            "the answer held {before:?}, then {after:?} after a removal"
        ))
    }
}

/// The chat hub's send under churn: look the user up, check whom to deliver to, then iterate
/// the same answer to deliver. One thread does that; another keeps replacing the user's
/// connection (connect a new one, then disconnect the old one, so no two states of the user are
/// alike), and at least one of its changes lands between each check and its iteration. The
/// iteration must find exactly the connections the check saw.
fn answer_holds_still_under_churn(store: &dyn Probe, rounds: usize) -> Result<(), String> {
    let bob = user("bob");
    let changes = AtomicUsize::new(0);
    let (sender_done, churn_done) = (AtomicBool::new(false), AtomicBool::new(false));
    store.connect(&bob, &conn("bob-0"));

    thread::scope(|s| {
        s.spawn(|| {
            // Bounded too, so a sender that panicked cannot leave this thread running forever.
            for k in 1..rounds.saturating_mul(100) {
                if sender_done.load(Ordering::Relaxed) {
                    break;
                }
                store.connect(&bob, &conn(&format!("bob-{k}")));
                changes.fetch_add(1, Ordering::Relaxed);
                store.disconnect(&bob, &conn(&format!("bob-{}", k - 1)));
                changes.fetch_add(1, Ordering::Relaxed);
            }
            churn_done.store(true, Ordering::Relaxed);
        });

        let result = (0..rounds).try_for_each(|round| {
            let answer = store.lookup(&bob);
            let checked = answer.read();
            // Let the other thread change bob's connections at least once before iterating,
            // whatever the scheduler does (a progress handshake, not a clock).
            let seen = changes.load(Ordering::Relaxed);
            while changes.load(Ordering::Relaxed) == seen && !churn_done.load(Ordering::Relaxed) {
                thread::yield_now();
            }
            let delivered = answer.read();
            if checked == delivered {
                Ok(())
            } else {
                Err(format!(
                    "round {round}: the check saw {checked:?}, iterating the same answer found \
                     {delivered:?}"
                ))
            }
        });
        sender_done.store(true, Ordering::Relaxed);
        result
    })
}

/// A connect that lands while the user's last connection is being removed is kept: it either
/// happened before the removal (the user stays) or after it (the user is re-created).
fn add_racing_the_last_removal_is_kept(store: &dyn Probe) -> Result<(), String> {
    let carol = user("carol");
    let (laptop, phone) = (conn("carol-laptop"), conn("carol-phone"));
    store.connect(&carol, &laptop);

    store.disconnect_racing(&carol, &laptop, &|| store.connect(&carol, &phone));

    if store.is_connected(&carol, &phone) {
        Ok(())
    } else {
        Err("carol-phone connected while carol-laptop was removed, and is gone".to_owned())
    }
}

/// Two threads connect and disconnect connections of one user, over and over. Each thread
/// checks that its own just-added connection is visible, right away and again after a yield
/// (a loss that happens a moment after the connect is caught too). Stops at the first
/// connection found missing.
fn concurrent_connects_are_kept(store: &dyn Probe, rounds: usize) -> Result<(), String> {
    let dave = user("dave");
    let lost = AtomicBool::new(false);

    let per_thread: Vec<Result<(), String>> = thread::scope(|s| {
        let workers: Vec<_> = (0..2)
            .map(|worker| {
                let (dave, lost) = (&dave, &lost);
                s.spawn(move || {
                    let visible = |round: usize, id: &ConnectionId| {
                        if store.is_connected(dave, id) {
                            Ok(())
                        } else {
                            lost.store(true, Ordering::Relaxed);
                            Err(format!(
                                "round {round}: worker {worker} connected {id} and it is gone"
                            ))
                        }
                    };
                    for round in 0..rounds {
                        if lost.load(Ordering::Relaxed) {
                            break;
                        }
                        let id = conn(&format!("w{worker}-{round}"));
                        store.connect(dave, &id);
                        visible(round, &id)?;
                        thread::yield_now();
                        visible(round, &id)?;
                        store.disconnect(dave, &id);
                        // Lets the other thread run between our disconnect and next connect even
                        // when both share one core.
                        thread::yield_now();
                    }
                    Ok(())
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().expect("a stress worker panicked"))
            .collect()
    });
    per_thread.into_iter().collect()
}

/// Widens the naive store's removal window for the stress test. Without it the window is a few
/// instructions wide and the loss shows up only now and then. `yield_now` lets the other thread
/// run inside the window when both share a core; the short spin keeps the window open for a
/// moment when each has its own core (a sleep would not do: the timer rounds it up to tens of
/// microseconds, and both threads fall into step, each sleeping while the other works).
fn widen_window() {
    thread::yield_now();
    for _ in 0..300 {
        std::hint::spin_loop();
    }
}

/// Held by each multi-threaded test, so two of them never compete for the cores.
static ONE_STRESS_AT_A_TIME: Mutex<()> = Mutex::new(());

fn one_stress_at_a_time() -> MutexGuard<'static, ()> {
    // A failed stress test must not fail the other one too.
    ONE_STRESS_AT_A_TIME
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
}

// ---------------------------------------------------------------------------------------------
// Race (c): a sweep racing a renewal
// ---------------------------------------------------------------------------------------------

/// A store with node leases, as the sweep check sees it: synchronous, one node at a time.
trait LeaseProbe: Sync {
    /// Gives `node` a lease that has already run out.
    fn expire(&self, node: &NodeId);

    /// Renews the lease of `node` for long enough to outlast the check.
    fn renew(&self, node: &NodeId);

    /// Records connection `id` of `user` on `node`, or records it again if it is there.
    fn record(&self, user: &UserId, id: &ConnectionId, node: &NodeId);

    /// Whether a lookup of `user` lists `id`.
    fn holds(&self, user: &UserId, id: &ConnectionId) -> bool;

    /// Sweeps while `during` runs. A store that decides which nodes are live before it walks
    /// the records runs `during` in between, the worst moment it exposes; a store that checks
    /// each record's lease as it walks runs `during` on another thread at the same time.
    fn sweep_racing(&self, during: &(dyn Fn() + Sync));
}

impl LeaseProbe for MemoryStore {
    fn expire(&self, node: &NodeId) {
        let _ = ready(self.heartbeat(node, Duration::ZERO)).expect("MemoryStore has leases");
    }

    fn renew(&self, node: &NodeId) {
        let _ =
            ready(self.heartbeat(node, Duration::from_secs(3600))).expect("MemoryStore has leases");
    }

    fn record(&self, user: &UserId, id: &ConnectionId, node: &NodeId) {
        let record = ConnectionRecord::new(id.clone(), user.clone(), node.clone(), t0());
        ready(self.reconnect(record)).expect("MemoryStore reconnect cannot fail");
    }

    fn holds(&self, user: &UserId, id: &ConnectionId) -> bool {
        Probe::is_connected(self, user, id)
    }

    fn sweep_racing(&self, during: &(dyn Fn() + Sync)) {
        concurrently(
            || {
                let _ = ready(self.sweep()).expect("MemoryStore sweep cannot fail");
            },
            during,
        );
    }
}

/// Leases and records behind two locks; its sweep takes a snapshot of the live nodes, then
/// removes every record whose node is not in it. It has race (c) only.
#[derive(Debug, Default)]
struct SnapshotSweepStore {
    leases: Mutex<HashMap<NodeId, Instant>>,
    users: Mutex<HashMap<UserId, HashMap<ConnectionId, NodeId>>>,
}

impl LeaseProbe for SnapshotSweepStore {
    fn expire(&self, node: &NodeId) {
        lock(&self.leases).insert(node.clone(), Instant::now());
    }

    fn renew(&self, node: &NodeId) {
        lock(&self.leases).insert(node.clone(), Instant::now() + Duration::from_secs(3600));
    }

    fn record(&self, user: &UserId, id: &ConnectionId, node: &NodeId) {
        lock(&self.users)
            .entry(user.clone())
            .or_default()
            .insert(id.clone(), node.clone());
    }

    fn holds(&self, user: &UserId, id: &ConnectionId) -> bool {
        lock(&self.users)
            .get(user)
            .is_some_and(|conns| conns.contains_key(id))
    }

    fn sweep_racing(&self, during: &(dyn Fn() + Sync)) {
        let now = Instant::now();
        let live: HashSet<NodeId> = lock(&self.leases)
            .iter()
            .filter(|(_, expires)| **expires > now)
            .map(|(node, _)| node.clone())
            .collect();
        // The window: the snapshot is taken, the records are not walked yet.
        during();
        lock(&self.users).retain(|_, conns| {
            conns.retain(|_, node| live.contains(node));
            !conns.is_empty()
        });
    }
}

/// A node whose lease ran out renews it while a sweep runs, then records its `users`
/// connections again (as a node does when it learns its lease had lapsed). Every connection
/// it recorded after renewing is kept: the sweep removed it before, or found the lease live.
fn renewal_during_a_sweep_keeps_what_follows(
    store: &dyn LeaseProbe,
    users: usize,
) -> Result<(), String> {
    let n1 = node("n1");
    let connections: Vec<(UserId, ConnectionId)> = (0..users)
        .map(|i| (user(&format!("user-{i}")), conn(&format!("c-{i}"))))
        .collect();
    for (u, id) in &connections {
        store.record(u, id, &n1);
    }
    store.expire(&n1);

    store.sweep_racing(&|| {
        store.renew(&n1);
        for (u, id) in &connections {
            store.record(u, id, &n1);
        }
    });

    let lost = connections
        .iter()
        .filter(|(u, id)| !store.holds(u, id))
        .count();
    if lost == 0 {
        Ok(())
    } else {
        Err(format!(
            "n1 renewed during a sweep and recorded {users} connections again; {lost} are gone"
        ))
    }
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[test]
fn lookup_answer_is_a_value_not_a_live_view() {
    let naive = answer_is_a_value(&LiveViewStore::default());
    assert!(
        naive.is_err(),
        "the check must catch the live view of the classic sample"
    );
    answer_is_a_value(&TwoStepStore::new())
        .expect("a copying lookup passes: the check targets live views only");

    answer_is_a_value(&MemoryStore::new()).expect("MemoryStore answers are values");
}

#[test]
fn lookup_answer_holds_still_while_connections_churn() {
    let _serial = one_stress_at_a_time();
    let naive = answer_holds_still_under_churn(&LiveViewStore::default(), STRESS_ROUNDS);
    assert!(
        naive.is_err(),
        "the check must catch a send whose answer changes between check and delivery"
    );

    answer_holds_still_under_churn(&MemoryStore::new(), STRESS_ROUNDS)
        .expect("MemoryStore answers never move");
}

#[test]
fn connect_inside_the_removal_window_is_kept() {
    // Deterministic: the naive store runs the concurrent connect exactly inside its window.
    let naive = add_racing_the_last_removal_is_kept(&TwoStepStore::new());
    assert!(
        naive.is_err(),
        "the check must catch the connect lost by the two-step removal"
    );
    add_racing_the_last_removal_is_kept(&LiveViewStore::default())
        .expect("a one-step removal passes: the check targets two-step removal only");

    add_racing_the_last_removal_is_kept(&MemoryStore::new())
        .expect("MemoryStore keeps a connect that races the last removal");
}

#[test]
fn concurrent_connects_and_disconnects_of_one_user_lose_nothing() {
    let _serial = one_stress_at_a_time();
    // The naive store's window is widened with `yield_now` and a short spin (see
    // `widen_window`); `MemoryStore` gets the very same threads and rounds.
    let naive =
        concurrent_connects_are_kept(&TwoStepStore::with_window(widen_window), STRESS_ROUNDS);
    assert!(
        naive.is_err(),
        "the stress must catch the two-step removal losing a connection"
    );

    let store = MemoryStore::new();
    concurrent_connects_are_kept(&store, STRESS_ROUNDS)
        .expect("MemoryStore loses no connection under the same stress");
    let counts = ready(store.counts()).expect("MemoryStore counts cannot fail");
    assert_eq!(
        counts,
        Counts::default(),
        "every connection was removed again"
    );
}

#[test]
fn a_node_that_renews_during_a_sweep_keeps_what_it_records() {
    // Deterministic: the naive store renews and re-records exactly inside its window.
    let naive = renewal_during_a_sweep_keeps_what_follows(&SnapshotSweepStore::default(), 10);
    assert!(
        naive.is_err(),
        "the check must catch a sweep that works from a snapshot of the live nodes"
    );

    // The renewal lands before, during or after the walk over the users, as the threads
    // fall; every round must keep every connection.
    let _serial = one_stress_at_a_time();
    for round in 0..SWEEP_ROUNDS {
        renewal_during_a_sweep_keeps_what_follows(&MemoryStore::new(), SWEEP_USERS)
            .unwrap_or_else(|e| panic!("round {round}: {e}"));
    }
}

/// Rounds of the sweep race on `MemoryStore`, each on a fresh store.
const SWEEP_ROUNDS: usize = 40;
/// Users (one connection each) of the node that renews: enough that a sweep takes a while.
const SWEEP_USERS: usize = 2_000;
