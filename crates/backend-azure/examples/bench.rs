//! Add+remove pairs per second, lookup latency and a page of users: the Azure store against
//! Azurite, beside the in-memory store and the sql store on SQLite, in one run, 64 tasks.
//!
//! ```text
//! cargo run --release -p switchboard-azure --example bench -- [pairs-per-task] [tasks]
//! ```
//!
//! `SWITCHBOARD_BENCH_AZURE` benchmarks the table service of that connection string (for
//! example an Azurite pinned to another core, or a real account) instead of starting an
//! Azurite.
#![allow(clippy::print_stdout, missing_docs)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use switchboard_azure::{AzureConfig, AzureStore};
use switchboard_core::testkit::{conn, record, user};
use switchboard_core::{ConnectionStore, PageRequest};
use switchboard_memory::MemoryStore;
use switchboard_sql::{SqlConfig, SqlStore};
use switchboard_testkit_azurite::Azurite;

async fn pairs(
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

async fn lookups(store: Arc<dyn ConnectionStore>) -> (Duration, Duration, Duration) {
    let adds: Vec<_> = (0..1000)
        .map(|u| {
            let store = store.clone();
            tokio::spawn(async move {
                for c in 0..2 {
                    store
                        .add(record(&format!("l{u}x{c}"), &format!("user{u}"), "bench"))
                        .await
                        .expect("add");
                }
            })
        })
        .collect();
    for a in adds {
        a.await.expect("task");
    }
    let mut samples = Vec::with_capacity(2000);
    for i in 0..2000 {
        let u = user(&format!("user{}", (i * 7) % 1000));
        let started = Instant::now();
        let found = store.connections(&u).await.expect("lookup");
        samples.push(started.elapsed());
        assert_eq!(found.len(), 2);
    }
    let started = Instant::now();
    let page = store.users(PageRequest::first(100)).await.expect("users");
    let page_time = started.elapsed();
    assert_eq!(page.users.len(), 100);
    samples.sort_unstable();
    (
        samples[samples.len() / 2],
        samples[samples.len() * 99 / 100],
        page_time,
    )
}

async fn run(name: &str, store: Arc<dyn ConnectionStore>, per_task: usize, tasks: usize) {
    // Warm up pools and connections.
    let _ = pairs(store.clone(), "w", 5, tasks).await;
    let rate = pairs(store.clone(), "p", per_task, tasks).await;
    let (p50, p99, page) = lookups(store).await;
    println!(
        "{name:<24} {rate:>10.0} pairs/s   lookup p50 {p50:>9.1?} p99 {p99:>9.1?}   users page(100) of 2000 records {page:>9.1?}"
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mut args = std::env::args().skip(1);
    let per_task: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(50);
    let tasks: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(64);
    println!(
        "{tasks} tasks x {per_task} add+remove pairs each; lookups: one task, 1000 users x 2 connections"
    );

    run("memory", Arc::new(MemoryStore::new()), per_task, tasks).await;

    let dir = std::env::temp_dir().join(format!("switchboard-azure-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("bench directory");
    let sqlite = SqlStore::open(SqlConfig::new(format!(
        "sqlite://{}",
        dir.join("bench.db").display()
    )))
    .await
    .expect("open SQLite");
    run(
        "sql (SQLite file, WAL)",
        Arc::new(sqlite.clone()),
        per_task,
        tasks,
    )
    .await;
    sqlite.close().await;
    let _ = std::fs::remove_dir_all(&dir);

    let (_azurite, connection_string) = match std::env::var("SWITCHBOARD_BENCH_AZURE") {
        Ok(cs) => (None, cs),
        Err(_) => {
            let azurite = Azurite::start();
            let cs = azurite.connection_string();
            (Some(azurite), cs)
        }
    };
    let table = format!("bench{}", std::process::id());
    let azure = AzureStore::open(
        AzureConfig::from_connection_string(&connection_string)
            .expect("connection string")
            .with_table(&table)
            .expect("table name"),
    )
    .await
    .expect("open the Azure store");
    let azure = Arc::new(azure);
    run("azure (Azurite)", azure.clone(), per_task, tasks).await;
    azure.delete_table().await.expect("delete the bench table");
}
