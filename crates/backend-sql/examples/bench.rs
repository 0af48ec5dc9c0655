//! Add+remove pairs per second and lookup latency: SQLite (file, WAL), PostgreSQL (a
//! throwaway local server) and the in-memory store, with 64 concurrent tasks.
//!
//! ```text
//! cargo run --release -p switchboard-sql --example bench -- [pairs-per-task] [tasks]
//! ```
//!
//! `SWITCHBOARD_BENCH_PG_URL` benchmarks an existing PostgreSQL instead of starting one;
//! `SWITCHBOARD_BENCH_PG_DURABLE=1` starts it with `fsync` and `synchronous_commit` on and
//! opens the store with synchronous commits.
#![allow(clippy::print_stdout, missing_docs)]

use std::sync::Arc;

use switchboard_core::ConnectionStore;
use switchboard_core::testkit::workload::measure;
use switchboard_memory::MemoryStore;
use switchboard_sql::{SqlConfig, SqlStore};
use switchboard_testkit_postgres::PostgresServer;

async fn run(name: &str, store: Arc<dyn ConnectionStore>, per_task: usize, tasks: usize) {
    println!(
        "{name:<28} {}",
        measure(store, per_task, tasks, 10, 5000).await
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mut args = std::env::args().skip(1);
    let per_task: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(200);
    let tasks: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(64);
    println!(
        "{tasks} tasks x {per_task} add+remove pairs each; lookups: one task, 1000 users x 2 connections"
    );

    run("memory", Arc::new(MemoryStore::new()), per_task, tasks).await;

    let dir = std::env::temp_dir().join(format!("switchboard-sql-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("bench directory");
    let sqlite = SqlStore::open(SqlConfig::new(format!(
        "sqlite://{}",
        dir.join("bench.db").display()
    )))
    .await
    .expect("open SQLite");
    run(
        "sqlite (file, WAL, NORMAL)",
        Arc::new(sqlite.clone()),
        per_task,
        tasks,
    )
    .await;
    sqlite.close().await;
    let _ = std::fs::remove_dir_all(&dir);

    let durable = std::env::var_os("SWITCHBOARD_BENCH_PG_DURABLE").is_some();
    let (_server, url) = match std::env::var("SWITCHBOARD_BENCH_PG_URL") {
        Ok(url) => (None, url),
        Err(_) => {
            let server = if durable {
                PostgresServer::start_with(&[("fsync", "on"), ("synchronous_commit", "on")])
            } else {
                PostgresServer::start()
            };
            let url = server.url();
            (Some(server), url)
        }
    };
    let pg = SqlStore::open(
        SqlConfig::new(url)
            .with_schema(format!("bench{}", std::process::id()))
            .with_synchronous_commit(durable),
    )
    .await
    .expect("open PostgreSQL");
    let label = if durable {
        "postgres (durable)"
    } else {
        "postgres (async commit)"
    };
    run(label, Arc::new(pg.clone()), per_task, tasks).await;
    pg.close().await;
}
