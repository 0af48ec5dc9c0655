//! Add+remove pairs per second, lookup latency and a page of users: the Azure store against
//! Azurite, beside the in-memory store and the sql store on SQLite, in one run, 64 tasks.
//!
//! ```text
//! cargo run --release -p switchboard-azure --example azure_bench -- [pairs-per-task] [tasks]
//! ```
//!
//! `SWITCHBOARD_BENCH_AZURE` benchmarks the table service of that connection string (for
//! example an Azurite pinned to another core, or a real account) instead of starting an
//! Azurite.
#![allow(clippy::print_stdout, missing_docs)]

use std::sync::Arc;

use switchboard_azure::{AzureConfig, AzureStore};
use switchboard_core::ConnectionStore;
use switchboard_core::testkit::workload::measure;
use switchboard_memory::MemoryStore;
use switchboard_sql::{SqlConfig, SqlStore};
use switchboard_testkit_azurite::Azurite;

async fn run(name: &str, store: Arc<dyn ConnectionStore>, per_task: usize, tasks: usize) {
    println!(
        "{name:<24} {}",
        measure(store, per_task, tasks, 5, 2000).await
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
