//! Connection-store benchmarks: connect+disconnect pairs per second and lookups per second, at
//! 1 and 2 threads, with 10k and 1M live connections pre-loaded (users with 2 connections
//! each), for [`MemoryStore`] (without leases, and `memory-leased`: with the live lease of the
//! node holding every connection, as on a server that heartbeats) and for the
//! single-global-mutex baseline in [`baseline`].
//!
//! Run with `cargo bench -p switchboard-memory --bench store` (about two minutes); results and
//! the machine they were measured on are in `docs/BENCHMARKS.md`. Benchmark ids read
//! `<operation>/<store>/<live connections>-<threads>t`, e.g. `connect_disconnect/memory/1M-2t`.
//!
//! * Both stores are called through `Arc<dyn ConnectionStore>`, so both pay the same
//!   `async-trait` cost (a boxed future per call). Their futures are ready at once and are
//!   polled once with a no-op waker: no runtime is involved.
//! * **connect_disconnect**: one iteration adds a new connection to a random user of the
//!   pre-loaded population and removes it again (the user keeps its 2 pre-loaded connections).
//! * **lookup**: one iteration looks up the connections of a random pre-loaded user (an answer
//!   of 2 records).
//! * With 2 threads each thread does half of the iterations on the shared store, at the same
//!   time, on random users of the same population (so they contend for the same locks), and the
//!   wall time of the whole batch is reported. Criterion's time per iteration is then the
//!   inverse of the total throughput; the latency one thread sees is twice that.
//! * Each thread cycles through its own pool of pre-built records, so building connection ids
//!   is not measured and no two threads ever use the same connection id.
//! * Every record, pre-loaded or new, carries the same `NodeId` (one reference-counted string),
//!   as on a real node, where the server clones its node id into each record. The threads
//!   share that reference count, as the server's tasks do.

mod baseline;

use std::hint::black_box;
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use switchboard_core::testkit::ready;
use switchboard_core::{ConnectionId, ConnectionRecord, ConnectionStore, NodeId, Removal, UserId};
use switchboard_memory::MemoryStore;

use baseline::GlobalMutexStore;

/// Pre-loaded live connections: (label, count).
const POPULATIONS: [(&str, usize); 2] = [("10k", 10_000), ("1M", 1_000_000)];
/// Pre-loaded connections per user.
const CONNECTIONS_PER_USER: usize = 2;
/// Thread counts measured.
const THREADS: [usize; 2] = [1, 2];
/// The node holding every connection.
const NODE: &str = "node-1";
/// Pre-built records per thread, used in a cycle.
const POOL_SIZE: usize = 1 << 16;

/// A small deterministic generator (SplitMix64), so every run picks the same "random" users.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        // `n` is far below 2^32 here, so the modulo bias is negligible.
        (self.next() % n as u64) as usize
    }
}

fn connected_at() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_700_000_000)
}

/// The users of a population of `connections` live connections.
fn population_users(connections: usize) -> Vec<UserId> {
    (0..connections / CONNECTIONS_PER_USER)
        .map(|i| UserId::new(&format!("user-{i:07}")).expect("valid bench user id"))
        .collect()
}

/// Adds `CONNECTIONS_PER_USER` connections for each of `users` on `node` to `store`.
fn preload(store: &dyn ConnectionStore, users: &[UserId], node: &NodeId) {
    for (i, user) in users.iter().enumerate() {
        for k in 0..CONNECTIONS_PER_USER {
            let id = ConnectionId::new(&format!("c-{i}-{k}")).expect("valid bench connection id");
            let record = ConnectionRecord::new(id, user.clone(), node.clone(), connected_at());
            ready(store.add(record)).expect("pre-loaded connection ids are unique");
        }
    }
}

/// One pool per thread: records of new connections on `node` (ids no other pool or the
/// population uses) for random users of the population.
fn pools(users: &[UserId], node: &NodeId, threads: usize) -> Vec<Vec<ConnectionRecord>> {
    let mut rng = SplitMix64(0x5EED);
    (0..threads)
        .map(|t| {
            (0..POOL_SIZE)
                .map(|k| {
                    let id = ConnectionId::new(&format!("bench-{t}-{k}"))
                        .expect("valid bench connection id");
                    let user = users[rng.below(users.len())].clone();
                    ConnectionRecord::new(id, user, node.clone(), connected_at())
                })
                .collect()
        })
        .collect()
}

/// `iters` connect+disconnect pairs, cycling through `pool`.
fn connect_disconnect(store: &dyn ConnectionStore, pool: &[ConnectionRecord], iters: u64) {
    for record in pool.iter().cycle().take(iters as usize) {
        ready(store.add(record.clone())).expect("bench connection ids are never live twice");
        let removal = ready(store.remove(record.user(), record.id()));
        assert!(
            matches!(removal, Ok(Removal::Removed)),
            "the connection just added is removed"
        );
    }
}

/// `iters` lookups of the users of `pool`, in its order.
fn lookup(store: &dyn ConnectionStore, pool: &[ConnectionRecord], iters: u64) {
    for record in pool.iter().cycle().take(iters as usize) {
        let answer = ready(store.connections(record.user())).expect("lookups cannot fail");
        black_box(answer);
    }
}

/// A measured loop: `iters` iterations on `store`, drawing from one pool.
type Work = fn(&dyn ConnectionStore, &[ConnectionRecord], u64);

/// Runs `iters` iterations of `work` split over `threads` threads (thread `t` uses
/// `pools[t]`) and returns the wall time from the moment all threads are ready until the last
/// one is done.
fn timed(
    threads: usize,
    iters: u64,
    store: &dyn ConnectionStore,
    pools: &[Vec<ConnectionRecord>],
    work: Work,
) -> Duration {
    if threads == 1 {
        let start = Instant::now();
        work(store, &pools[0], iters);
        return start.elapsed();
    }
    let go = Barrier::new(threads + 1);
    thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                let share = iters / threads as u64 + u64::from((t as u64) < iters % threads as u64);
                let (go, pool) = (&go, &pools[t]);
                s.spawn(move || {
                    go.wait();
                    work(store, pool, share);
                })
            })
            .collect();
        go.wait();
        let start = Instant::now();
        for w in workers {
            w.join().expect("a bench thread panicked");
        }
        start.elapsed()
    })
}

/// The stores measured: (name, constructor with room for `users` users).
type MakeStore = fn(usize) -> Arc<dyn ConnectionStore>;

const STORES: [(&str, MakeStore); 3] = [
    ("memory", |users| {
        Arc::new(MemoryStore::with_capacity(users))
    }),
    ("memory-leased", |users| {
        let store = MemoryStore::with_capacity(users);
        let node = NodeId::new(NODE).expect("valid bench node id");
        let _ = ready(store.heartbeat(&node, Duration::from_secs(3600)))
            .expect("the memory store has leases");
        Arc::new(store)
    }),
    ("global-mutex", |users| {
        Arc::new(GlobalMutexStore::with_capacity(users))
    }),
];

fn stores(c: &mut Criterion) {
    let max_threads = THREADS.iter().copied().max().unwrap_or(1);
    for (population, connections) in POPULATIONS {
        let node = NodeId::new(NODE).expect("valid bench node id");
        let users = population_users(connections);
        let pools = pools(&users, &node, max_threads);
        for (name, make) in STORES {
            // Built once per store and population, shared by its four benchmarks.
            let store = make(users.len());
            preload(&*store, &users, &node);

            let ops: [(&str, Work); 2] = [
                ("connect_disconnect", connect_disconnect),
                ("lookup", lookup),
            ];
            for (op, work) in ops {
                let mut group = c.benchmark_group(op);
                group
                    .throughput(Throughput::Elements(1))
                    .sample_size(20)
                    .warm_up_time(Duration::from_secs(1))
                    .measurement_time(Duration::from_secs(5));
                for threads in THREADS {
                    let id = BenchmarkId::new(name, format!("{population}-{threads}t"));
                    group.bench_function(id, |b| {
                        b.iter_custom(|iters| timed(threads, iters, &*store, &pools, work));
                    });
                }
                group.finish();
            }
        }
    }
}

criterion_group!(benches, stores);
criterion_main!(benches);
