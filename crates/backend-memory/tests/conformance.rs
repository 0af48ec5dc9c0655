//! The shared conformance suite, run against [`MemoryStore`].

use std::sync::Arc;

use switchboard_core::ConnectionStore;
use switchboard_core::testkit::Harness;
use switchboard_memory::MemoryStore;

struct Memory;

#[switchboard_core::async_trait]
impl Harness for Memory {
    async fn store(&self, _namespace: &str) -> Arc<dyn ConnectionStore> {
        Arc::new(MemoryStore::new())
    }

    fn proptest_cases(&self) -> u32 {
        256
    }
}

switchboard_core::conformance_tests!(Memory);
