//! Checks shared by the SQLite and PostgreSQL test files, run against a store of each.

use std::time::Duration;

use switchboard_core::testkit::{conn, record, user};
use switchboard_core::{ConnectionStore, Removal};
use switchboard_sql::SqlStore;

/// Concurrent writes are group-committed; each caller still gets its own answer: of many
/// adds of one id exactly one succeeds and the others conflict, of many removals exactly one
/// removes, and callers that give up early do not stall the others.
pub async fn batched_writes_answer_each_caller(store: SqlStore) {
    let adds: Vec<_> = (0..64)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                let ok = store.add(record("dup", "ann", "n1")).await.is_ok();
                let own = store
                    .add(record(&format!("own{i}"), "bob", "n1"))
                    .await
                    .is_ok();
                (ok, own)
            })
        })
        .collect();
    let mut added = 0;
    for task in adds {
        let (ok, own) = task.await.expect("task");
        assert!(own, "distinct ids never conflict");
        added += usize::from(ok);
    }
    assert_eq!(added, 1, "exactly one add of a duplicate id wins");
    // Callers that give up at once.
    for i in 0..32 {
        let store = store.clone();
        let gave_up = tokio::time::timeout(
            Duration::from_micros(1),
            store.add(record(&format!("gone{i}"), "cat", "n1")),
        )
        .await;
        drop(gave_up);
    }
    let removes: Vec<_> = (0..64)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                let dup = store
                    .remove(&user("ann"), &conn("dup"))
                    .await
                    .expect("remove");
                let own = store
                    .remove(&user("bob"), &conn(&format!("own{i}")))
                    .await
                    .expect("remove own");
                (dup, own)
            })
        })
        .collect();
    let mut removed = 0;
    for task in removes {
        let (dup, own) = task.await.expect("task");
        assert_eq!(own, Removal::Removed);
        removed += usize::from(dup == Removal::Removed);
    }
    assert_eq!(removed, 1, "exactly one removal of one id removes");
    for i in 0..32 {
        let _ = store.remove(&user("cat"), &conn(&format!("gone{i}"))).await;
    }
    let counts = store.counts().await.expect("counts");
    assert_eq!((counts.users, counts.connections), (0, 0));
    assert!(
        store
            .users(switchboard_core::PageRequest::first(10))
            .await
            .expect("users")
            .users
            .is_empty()
    );
}
