//! The shared conformance suite, run against the custom store.

use std::sync::Arc;

use example_custom_store::LimitedStore;
use switchboard_core::testkit::{Harness, record, user};
use switchboard_core::{ConnectionStore, StoreError, async_trait};
use switchboard_memory::MemoryStore;

struct Limited;

#[async_trait]
impl Harness for Limited {
    async fn store(&self, _namespace: &str) -> Arc<dyn ConnectionStore> {
        Arc::new(LimitedStore::new(Arc::new(MemoryStore::new()), 16))
    }
}

switchboard_core::conformance_tests!(Limited);

#[tokio::test]
async fn the_limit_is_enforced_and_frees_up() {
    let store = LimitedStore::new(Arc::new(MemoryStore::new()), 2);
    store.add(record("c1", "ann", "n")).await.expect("first");
    store.add(record("c2", "ann", "n")).await.expect("second");
    let err = store
        .add(record("c3", "ann", "n"))
        .await
        .expect_err("third");
    assert!(matches!(err, StoreError::Refused { .. }), "{err}");
    assert!(
        !err.is_transient(),
        "a policy refusal is not worth retrying"
    );
    let _ = store
        .remove(&user("ann"), &switchboard_core::testkit::conn("c1"))
        .await
        .expect("remove");
    store
        .add(record("c3", "ann", "n"))
        .await
        .expect("room again");
    store
        .add(record("b1", "bob", "n"))
        .await
        .expect("other users are not limited");
}
