//! SQLite-specific behaviour: records outlive a crashed process and are swept after its lease
//! expires; `users` stays exact under concurrency.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use switchboard_core::testkit::{conn, node, record, unique_namespace, user};
use switchboard_core::{ConnectionStore, Lease, PageRequest, Removal};
use switchboard_sql::{Dialect, SqlConfig, SqlStore};

fn db_path() -> PathBuf {
    let dir = std::env::temp_dir().join("switchboard-sql-tests");
    std::fs::create_dir_all(&dir).expect("test directory");
    dir.join(format!("{}.db", unique_namespace()))
}

fn remove_db(path: &Path) {
    for suffix in ["", "-wal", "-shm"] {
        let mut p = path.as_os_str().to_owned();
        p.push(suffix);
        let _ = std::fs::remove_file(p);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_of_a_crashed_process_survive_until_its_lease_expires_and_a_sweep() {
    let path = db_path();
    let url = format!("sqlite://{}", path.display());
    {
        let store = SqlStore::open(SqlConfig::new(url.clone()))
            .await
            .expect("open");
        assert_eq!(store.dialect(), Dialect::Sqlite);
        assert_eq!(
            store
                .heartbeat(&node("n1"), Duration::from_millis(600))
                .await
                .expect("beat"),
            Lease::Taken
        );
        store.add(record("c1", "ann", "n1")).await.expect("add");
        store.add(record("c2", "bob", "n1")).await.expect("add");
        // Dropped without release: the process "crashed".
    }
    let store = SqlStore::open(SqlConfig::new(url)).await.expect("reopen");
    assert_eq!(
        store.connections(&user("ann")).await.expect("lookup").len(),
        1
    );
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert!(
        store
            .connections(&user("ann"))
            .await
            .expect("lookup")
            .is_empty()
    );
    assert!(
        store
            .users(PageRequest::first(10))
            .await
            .expect("users")
            .users
            .is_empty()
    );
    assert_eq!(store.sweep().await.expect("sweep"), 2);
    assert_eq!(
        store
            .remove(&user("ann"), &conn("c1"))
            .await
            .expect("remove"),
        Removal::NotFound
    );
    store.close().await;
    remove_db(&path);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_stay_exact_under_concurrent_adds_and_removes_of_one_user() {
    let path = db_path();
    let store = SqlStore::open(SqlConfig::new(format!("sqlite://{}", path.display())))
        .await
        .expect("open");
    let tasks: Vec<_> = (0..64)
        .map(|t| {
            let store = store.clone();
            tokio::spawn(async move {
                let name = ["ann", "bob"][t % 2];
                for i in 0..40 {
                    let id = format!("t{t}i{i}");
                    store.add(record(&id, name, "n1")).await.expect("add");
                    if !(t % 4 == 0 && i == 39) {
                        assert_eq!(
                            store.remove(&user(name), &conn(&id)).await.expect("remove"),
                            Removal::Removed
                        );
                    }
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("task");
    }
    let counts = store.counts().await.expect("counts");
    assert_eq!((counts.users, counts.connections), (1, 16));
    assert_eq!(
        store
            .users(PageRequest::first(10))
            .await
            .expect("users")
            .users,
        vec![user("ann")]
    );
    store.close().await;
    remove_db(&path);
}

#[tokio::test]
async fn an_in_memory_database_is_one_shared_database() {
    let store = SqlStore::open(SqlConfig::new("sqlite::memory:"))
        .await
        .expect("open");
    store.add(record("c1", "ann", "n1")).await.expect("add");
    assert_eq!(
        store.connections(&user("ann")).await.expect("lookup").len(),
        1
    );
    let caps = store.capabilities();
    assert!(!caps.survives_restart && !caps.shared_across_nodes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_writes_answer_each_caller_on_sqlite() {
    let path = db_path();
    let store = SqlStore::open(SqlConfig::new(format!("sqlite://{}", path.display())))
        .await
        .expect("open");
    common::batched_writes_answer_each_caller(store.clone()).await;
    store.close().await;
    remove_db(&path);
}
