//! The store benchmarks' workload, shared so that every store's numbers measure the same
//! thing: add + remove pairs from many tasks, lookups from one task, and a page of users.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::store::{ConnectionStore, PageRequest};

use super::{conn, record, user};

/// `tasks` tasks each add and remove `per_task` connections (ids `{prefix}{task}x{i}`, users
/// `user0`..`user999`), all at once; answers the pairs per second.
///
/// # Panics
///
/// When an operation fails: a benchmark has no answer to give then.
pub async fn add_remove_pairs(
    store: Arc<dyn ConnectionStore>,
    prefix: &str,
    per_task: usize,
    tasks: usize,
) -> f64 {
    let started = Instant::now();
    let handles: Vec<_> = (0..tasks)
        .map(|t| {
            let store = store.clone();
            let prefix = prefix.to_owned();
            tokio::spawn(async move {
                for i in 0..per_task {
                    let id = format!("{prefix}{t}x{i}");
                    let name = format!("user{}", (t * 31 + i) % 1000);
                    store.add(record(&id, &name, "bench")).await.expect("add");
                    let _ = store
                        .remove(&user(&name), &conn(&id))
                        .await
                        .expect("remove");
                }
            })
        })
        .collect();
    for h in handles {
        h.await.expect("task");
    }
    (per_task * tasks) as f64 / started.elapsed().as_secs_f64()
}

/// What [`lookups`] measured.
#[derive(Debug, Clone, Copy)]
pub struct LookupTimes {
    /// Median time of one user's lookup (2 connections).
    pub p50: Duration,
    /// 99th percentile of the same.
    pub p99: Duration,
    /// Time of the first page of 100 users.
    pub page: Duration,
}

/// Records 1000 users × 2 connections (from 64 tasks), then times `samples` lookups from
/// one task and the first page of 100 users.
///
/// # Panics
///
/// When an operation fails or answers the wrong records.
pub async fn lookups(store: Arc<dyn ConnectionStore>, samples: usize) -> LookupTimes {
    const SETUP_TASKS: usize = 64;
    let adds: Vec<_> = (0..SETUP_TASKS)
        .map(|t| {
            let store = store.clone();
            tokio::spawn(async move {
                for u in (t..1000).step_by(SETUP_TASKS) {
                    for c in 0..2 {
                        store
                            .add(record(&format!("l{u}x{c}"), &format!("user{u}"), "bench"))
                            .await
                            .expect("add");
                    }
                }
            })
        })
        .collect();
    for a in adds {
        a.await.expect("task");
    }
    let mut times = Vec::with_capacity(samples.max(1));
    for i in 0..samples.max(1) {
        let u = user(&format!("user{}", (i * 7) % 1000));
        let started = Instant::now();
        let found = store.connections(&u).await.expect("lookup");
        times.push(started.elapsed());
        assert_eq!(found.len(), 2);
    }
    let started = Instant::now();
    let page = store.users(PageRequest::first(100)).await.expect("users");
    let page_time = started.elapsed();
    assert_eq!(page.users.len(), 100);
    times.sort_unstable();
    LookupTimes {
        p50: times[times.len() / 2],
        p99: times[times.len() * 99 / 100],
        page: page_time,
    }
}

/// What [`measure`] found for one store.
#[derive(Debug, Clone, Copy)]
pub struct Measured {
    /// Add + remove pairs per second, from [`add_remove_pairs`].
    pub pairs_per_second: f64,
    /// The lookup and page times, from [`lookups`].
    pub lookups: LookupTimes,
}

impl std::fmt::Display for Measured {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:>10.0} pairs/s   lookup p50 {:>9.1?} p99 {:>9.1?}   users page(100) {:>9.1?}",
            self.pairs_per_second, self.lookups.p50, self.lookups.p99, self.lookups.page
        )
    }
}

/// The whole workload on `store`: `warmup` pairs per task to warm pools and caches, then
/// [`add_remove_pairs`] and [`lookups`] with `samples` lookups.
///
/// # Panics
///
/// When an operation fails.
pub async fn measure(
    store: Arc<dyn ConnectionStore>,
    per_task: usize,
    tasks: usize,
    warmup: usize,
    samples: usize,
) -> Measured {
    let _ = add_remove_pairs(store.clone(), "w", warmup, tasks).await;
    let pairs_per_second = add_remove_pairs(store.clone(), "p", per_task, tasks).await;
    Measured {
        pairs_per_second,
        lookups: lookups(store, samples).await,
    }
}
