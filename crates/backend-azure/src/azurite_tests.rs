//! Tests against a real Azurite of what the store suite cannot see: the entities' layout on
//! the wire, the clock, outages, refused credentials and batching.

use std::sync::Arc;
use std::time::{Duration, Instant, UNIX_EPOCH};

use switchboard_core::{ConnectionId, ConnectionRecord, ConnectionStore, NodeId, UserId};
use switchboard_testkit_azurite::Azurite;

use super::*;

fn config(azurite: &Azurite, table: &str) -> AzureConfig {
    AzureConfig::from_connection_string(&azurite.connection_string())
        .expect("Azurite's connection string")
        .with_table(table)
        .expect("a valid table name")
}

fn record(id: &str, user: &str, node: &str) -> ConnectionRecord {
    ConnectionRecord::new(
        ConnectionId::new(id).expect("valid id"),
        UserId::new(user).expect("valid user"),
        NodeId::new(node).expect("valid node"),
        UNIX_EPOCH + Duration::from_millis(1_764_690_600_123),
    )
}

async fn open(azurite: &Azurite, table: &str) -> AzureStore {
    AzureStore::open(config(azurite, table))
        .await
        .expect("open the store")
}

#[tokio::test]
async fn entities_have_the_documented_layout() {
    let azurite = Azurite::shared();
    let store = open(&azurite, "layout").await;
    store
        .add(record("c1", "o'brien", "node-a").with_user_agent("Mozilla/5.0"))
        .await
        .expect("add");
    let rows = store
        .table
        .query::<serde_json::Value>(
            "PartitionKey eq 'o~27brien'".to_owned(),
            "PartitionKey,RowKey,User,UserAgent,ConnectedAt,Node",
        )
        .await
        .expect("query");
    assert_eq!(rows.len(), 1, "one entity in the user's partition");
    let entity = &rows[0].entity;
    assert_eq!(entity["RowKey"], "c1");
    assert_eq!(entity["User"], "o'brien");
    assert_eq!(entity["UserAgent"], "Mozilla/5.0");
    assert_eq!(entity["Node"], "node-a");
    assert_eq!(entity["ConnectedAt"], "2025-12-02T15:50:00.123Z");
    assert_eq!(entity["ConnectedAt@odata.type"], "Edm.DateTime");

    let _ = store
        .heartbeat(
            &NodeId::new("node-a").expect("valid"),
            Duration::from_secs(30),
        )
        .await
        .expect("heartbeat");
    let lease = store
        .table
        .get::<serde_json::Value>(LEASES, "node-a")
        .await
        .expect("read the lease")
        .expect("the lease is in its partition");
    assert_eq!(lease.entity["TtlMs"], "30000");
    assert_eq!(lease.entity["TtlMs@odata.type"], "Edm.Int64");
    store.delete_table().await.expect("delete the table");
}

#[tokio::test]
async fn the_clock_is_read_from_the_etag_of_a_write() {
    let azurite = Azurite::shared();
    let store = open(&azurite, "clockread").await;
    let etag = store
        .table
        .upsert(LEASES, CLOCK_ROW, &ClockEntity { purpose: "clock" })
        .await
        .expect("write the clock row");
    let from_etag = etag_time(&etag).expect("the ETag carries the write's time");
    let read = store
        .table
        .get::<serde_json::Value>(LEASES, CLOCK_ROW)
        .await
        .expect("read it back")
        .expect("it exists");
    assert_eq!(ServiceTime::parse(&read.timestamp), Some(from_etag));
    store.delete_table().await.expect("delete the table");
}

#[tokio::test]
async fn an_outage_fails_transiently_in_bounded_time_and_the_store_recovers_by_itself() {
    let azurite = Azurite::start();
    let budget = Duration::from_millis(800);
    let store = AzureStore::open(config(&azurite, "outage").with_retry_budget(budget))
        .await
        .expect("open");
    store.add(record("c1", "ann", "n")).await.expect("add");
    azurite.stop();
    let started = Instant::now();
    let err = store
        .add(record("c2", "ann", "n"))
        .await
        .expect_err("the service is down");
    assert!(err.is_transient(), "an outage is transient: {err}");
    assert!(
        started.elapsed() < budget + DEFAULT_REQUEST_TIMEOUT + Duration::from_secs(2),
        "gave up after {:?}, not within the retry budget",
        started.elapsed()
    );
    let err = store
        .connections(&UserId::new("ann").expect("valid"))
        .await
        .expect_err("the service is down");
    assert!(err.is_transient(), "{err}");

    // The in-memory emulator comes back empty: the store creates its table again.
    azurite.start_again();
    store
        .add(record("c3", "ann", "n"))
        .await
        .expect("add after the restart");
    let ids: Vec<String> = store
        .connections(&UserId::new("ann").expect("valid"))
        .await
        .expect("lookup")
        .iter()
        .map(|r| r.id().to_string())
        .collect();
    assert_eq!(ids, ["c3"]);
}

#[tokio::test]
async fn a_wrong_account_key_is_refused_at_once_and_permanently() {
    let azurite = Azurite::shared();
    let wrong = azurite.connection_string().replace(
        switchboard_testkit_azurite::ACCOUNT_KEY,
        "d3Jvbmcta2V5LXdyb25nLWtleS13cm9uZy1rZXk=",
    );
    let config = AzureConfig::from_connection_string(&wrong)
        .expect("a well-formed string")
        .with_table("wrongkey")
        .expect("valid");
    let started = Instant::now();
    let err = AzureStore::open(config)
        .await
        .expect_err("the key is wrong");
    assert!(!err.is_transient(), "a wrong key is permanent: {err}");
    assert!(err.to_string().contains("403"), "{err}");
    assert!(
        started.elapsed() < DEFAULT_RETRY_BUDGET,
        "a permanent error must not be retried"
    );
}

#[tokio::test]
async fn sweeps_delete_in_transactions_of_at_most_a_hundred() {
    let azurite = Azurite::shared();
    let store = open(&azurite, "bigsweep").await;
    for i in 0..250 {
        store
            .add(record(&format!("c{i}"), "many", "gone-node"))
            .await
            .expect("add");
    }
    store
        .add(record("k1", "keep", "live-node"))
        .await
        .expect("add");
    let _ = store
        .heartbeat(
            &NodeId::new("live-node").expect("valid"),
            Duration::from_secs(60),
        )
        .await
        .expect("heartbeat");
    let rows = store
        .table
        .query::<StoredConnection>("PartitionKey eq 'many'".to_owned(), "PartitionKey,RowKey")
        .await
        .expect("query");
    let first: Vec<(String, String)> = rows
        .into_iter()
        .take(table::MAX_BATCH)
        .map(|r| (r.entity.row, r.etag))
        .collect();
    assert_eq!(
        store
            .table
            .delete_batch("many", &first)
            .await
            .expect("a transaction"),
        BatchOutcome::AllDeleted,
        "a full transaction of current ETags deletes them all"
    );
    assert_eq!(
        store.sweep().await.expect("sweep"),
        150,
        "two transactions: 100 and 50"
    );
    let many = UserId::new("many").expect("valid");
    assert!(store.connections(&many).await.expect("lookup").is_empty());
    assert_eq!(
        store
            .connections(&UserId::new("keep").expect("valid"))
            .await
            .expect("lookup")
            .len(),
        1
    );
    store.delete_table().await.expect("delete the table");
}

#[tokio::test]
async fn a_transaction_with_a_changed_entity_falls_back_to_single_conditional_deletes() {
    let azurite = Azurite::shared();
    let store = open(&azurite, "rollback").await;
    for id in ["c1", "c2", "c3"] {
        store.add(record(id, "ann", "n")).await.expect("add");
    }
    let rows = store
        .table
        .query::<StoredConnection>("PartitionKey eq 'ann'".to_owned(), "PartitionKey,RowKey")
        .await
        .expect("query");
    // c2 is written again after it was read: its ETag changes.
    store
        .reconnect(record("c2", "ann", "n").with_user_agent("again"))
        .await
        .expect("reconnect");
    let rows: Vec<(String, String)> = rows.into_iter().map(|r| (r.entity.row, r.etag)).collect();
    assert_eq!(
        store
            .table
            .delete_batch("ann", &rows)
            .await
            .expect("a transaction"),
        BatchOutcome::RolledBack,
        "one stale ETag fails the whole transaction"
    );
    let deleted = store.delete_rows("ann", rows, true).await.expect("delete");
    assert_eq!(deleted, 2, "the changed entity stays");
    let left: Vec<String> = store
        .connections(&UserId::new("ann").expect("valid"))
        .await
        .expect("lookup")
        .iter()
        .map(|r| r.id().to_string())
        .collect();
    assert_eq!(left, ["c2"]);
    store.delete_table().await.expect("delete the table");
}

#[tokio::test]
async fn a_hung_service_fails_every_caller_in_bounded_time() {
    let azurite = Azurite::start();
    let timeout = Duration::from_millis(300);
    let budget = Duration::from_millis(600);
    let store = Arc::new(
        AzureStore::open(
            config(&azurite, "hung")
                .with_request_timeout(timeout)
                .with_retry_budget(budget)
                .with_max_in_flight(2),
        )
        .await
        .expect("open"),
    );
    store.add(record("c0", "ann", "n")).await.expect("add");
    azurite.pause();
    let started = Instant::now();
    // Ten callers share two turns: each waits for a turn at most the request timeout, so
    // none waits behind the others' retries.
    let callers: Vec<_> = (0..10)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move { store.add(record(&format!("c{}", i + 1), "ann", "n")).await })
        })
        .collect();
    for caller in callers {
        let err = caller
            .await
            .expect("caller task")
            .expect_err("the service answers nothing");
        assert!(err.is_transient(), "a hung service is transient: {err}");
    }
    let bound = budget + 2 * timeout + BACKOFF.1;
    assert!(
        started.elapsed() < bound,
        "callers gave up after {:?}, beyond {bound:?}",
        started.elapsed()
    );
    azurite.resume();
    store
        .add(record("c11", "ann", "n"))
        .await
        .expect("the service answers again");
}
