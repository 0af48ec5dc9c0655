//! The benchmark baseline (one global mutex around a map of maps, the classic design) is a
//! correct store: it passes the same conformance suite, so the benchmarks compare speed only.

#[path = "../benches/baseline.rs"]
mod baseline;

use std::sync::Arc;

use switchboard_core::ConnectionStore;
use switchboard_core::testkit::Harness;

struct Baseline;

#[switchboard_core::async_trait]
impl Harness for Baseline {
    async fn store(&self, _namespace: &str) -> Arc<dyn ConnectionStore> {
        Arc::new(baseline::GlobalMutexStore::with_capacity(16))
    }
}

switchboard_core::conformance_tests!(Baseline);
