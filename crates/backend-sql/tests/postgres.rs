//! PostgreSQL-specific behaviour: concurrent opening, exact `users` rows under concurrent
//! connects and disconnects of one user, and outages.

mod common;

use std::time::{Duration, Instant};

use sqlx::Connection as _;
use switchboard_core::testkit::{conn, node, record, unique_namespace, user};
use switchboard_core::{ConnectionStore, Removal};
use switchboard_sql::{Dialect, SqlConfig, SqlStore};
use switchboard_testkit_postgres::PostgresServer;

async fn drop_schema(url: &str, schema: &str) {
    let mut c = sqlx::PgConnection::connect(url).await.expect("connect");
    sqlx::query(&format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"))
        .execute(&mut c)
        .await
        .expect("drop schema");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_opening_together_on_a_fresh_schema_do_not_race() {
    let server = PostgresServer::shared();
    let schema = unique_namespace();
    let opens: Vec<_> = (0..8)
        .map(|_| {
            let config = SqlConfig::new(server.url())
                .with_schema(schema.clone())
                .with_pool_size(2);
            tokio::spawn(SqlStore::open(config))
        })
        .collect();
    let mut stores = Vec::new();
    for open in opens {
        stores.push(open.await.expect("task").expect("every node opens"));
    }
    assert!(stores.iter().all(|s| s.dialect() == Dialect::Postgres));
    stores[0]
        .add(record("c1", "ann", "n1"))
        .await
        .expect("add on the first node");
    let seen = stores[7].connections(&user("ann")).await.expect("lookup");
    assert_eq!(seen.len(), 1, "the nodes share one schema");
    drop(stores);
    drop_schema(&server.url(), &schema).await;
}

/// Many tasks connect and disconnect the same few users at once; afterwards `users` holds
/// exactly the users with connections, with exact counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_stay_exact_under_concurrent_adds_and_removes_of_one_user() {
    let server = PostgresServer::shared();
    let schema = unique_namespace();
    let store = SqlStore::open(
        SqlConfig::new(server.url())
            .with_schema(schema.clone())
            .with_pool_size(16),
    )
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
                    // Keep the last connection of every fourth task.
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
    let mut c = sqlx::PgConnection::connect(&server.url())
        .await
        .expect("connect");
    let rows: Vec<(String, i64)> = sqlx::query_as(&format!(
        "SELECT user_id, connections FROM \"{schema}\".users ORDER BY user_id"
    ))
    .fetch_all(&mut c)
    .await
    .expect("read users");
    // Tasks 0, 4, 8, ... (ann) keep one each: 16 connections, all ann's.
    assert_eq!(rows, vec![("ann".to_owned(), 16)]);
    let counts = store.counts().await.expect("counts");
    assert_eq!((counts.users, counts.connections), (1, 16));
    drop(store);
    drop_schema(&server.url(), &schema).await;
}

/// While PostgreSQL is down, operations fail fast and transiently; once it is back, the same
/// store works again without being reopened.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outages_fail_fast_and_the_pool_recovers() {
    let server = PostgresServer::start();
    let timeout = Duration::from_millis(500);
    let store = SqlStore::open(
        SqlConfig::new(server.url())
            .with_acquire_timeout(timeout)
            .with_pool_size(4),
    )
    .await
    .expect("open");
    store.add(record("c1", "ann", "n1")).await.expect("add");

    server.stop();
    for i in 0..4 {
        let started = Instant::now();
        let err = store
            .add(record(&format!("d{i}"), "ann", "n1"))
            .await
            .expect_err("the database is down");
        let took = started.elapsed();
        assert!(
            err.is_transient(),
            "expected a transient error, got {err:?}"
        );
        assert!(
            took < timeout + Duration::from_secs(1),
            "failed after {took:?}, not fast"
        );
        let err = store
            .connections(&user("ann"))
            .await
            .expect_err("the database is down");
        assert!(
            err.is_transient(),
            "expected a transient error, got {err:?}"
        );
    }

    server.start_again();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match store.connections(&user("ann")).await {
            Ok(records) => {
                assert_eq!(records.len(), 1, "the data survived the restart");
                break;
            }
            Err(e) if e.is_transient() && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("the store did not recover: {e:?}"),
        }
    }
    store
        .add(record("c2", "ann", "n1"))
        .await
        .expect("add after recovery");
    assert_eq!(
        store
            .remove(&user("ann"), &conn("c2"))
            .await
            .expect("remove"),
        Removal::Removed
    );
    let _ = store
        .heartbeat(&node("n1"), Duration::from_secs(60))
        .await
        .expect("heartbeat");
    store.close().await;
}

#[tokio::test]
async fn bad_configurations_are_refused_clearly() {
    let err = SqlStore::open(SqlConfig::new("postgres://u:pw@127.0.0.1:1/db").with_schema("Bad\""))
        .await
        .expect_err("bad schema");
    assert!(err.to_string().contains("invalid schema name"), "{err}");
    let err = SqlStore::open(
        SqlConfig::new("postgres://u:hunter2@127.0.0.1:1/db")
            .with_acquire_timeout(Duration::from_millis(300)),
    )
    .await
    .expect_err("nobody listens on port 1");
    let message = format!("{err} {err:?}");
    assert!(
        !message.contains("hunter2"),
        "the password leaked: {message}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_writes_answer_each_caller_on_postgres() {
    let server = PostgresServer::shared();
    let schema = unique_namespace();
    let store = SqlStore::open(SqlConfig::new(server.url()).with_schema(schema.clone()))
        .await
        .expect("open");
    common::batched_writes_answer_each_caller(store.clone()).await;
    store.close().await;
    drop_schema(&server.url(), &schema).await;
}
