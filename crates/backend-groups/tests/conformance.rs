//! The shared conformance suite, run against [`GroupStore`], claims included.

use std::sync::Arc;

use switchboard_core::ConnectionStore;
use switchboard_core::testkit::Harness;
use switchboard_groups::GroupStore;

struct Groups;

#[switchboard_core::async_trait]
impl Harness for Groups {
    /// Every instance holds its own groups (another node, or a restart, starts empty).
    async fn store(&self, _namespace: &str) -> Arc<dyn ConnectionStore> {
        Arc::new(GroupStore::new())
    }
}

switchboard_core::conformance_tests!(Groups);
