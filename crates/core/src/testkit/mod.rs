//! The conformance suite every [`ConnectionStore`] must pass.
//!
//! A store crate runs the whole suite with one line in its `tests/conformance.rs`:
//!
//! ```ignore
//! switchboard_core::conformance_tests!(MyHarness::new());
//! ```
//!
//! The macro expands to one test per behaviour (see [`cases`]). The harness hands out a fresh,
//! isolated store for every test ([`Harness::store`] gets a unique namespace: use it as a table
//! name, key prefix or partition), so suites of different stores can share one real database.
//! The calling crate needs `tokio` (with the `macros` and `rt-multi-thread` features) as a
//! dev-dependency.
//!
//! [`ReferenceStore`] is the suite's sequential model written as a store: obviously correct,
//! slow, single-lock. It passes the suite and doubles as a fake in unit tests.

pub mod backplane_cases;
pub mod backplane_suite;
mod bus;
pub mod cases;
mod reference;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;

use crate::{ConnectionId, ConnectionRecord, ConnectionStore, NodeId, UserId};

pub use backplane_suite::{BACKPLANE_CASES, BackplaneHarness, MemoryBusHarness};
pub use bus::MemoryBus;
pub use reference::ReferenceStore;

/// Builds the stores the conformance suite runs against.
#[async_trait]
pub trait Harness: Send + Sync {
    /// A fresh store that shares no records with any other store this harness made.
    /// `namespace` is unique per call: 3 to 40 characters, lowercase ASCII letters and digits,
    /// starting with a letter (valid as a SQL table name and an Azure table name).
    async fn store(&self, namespace: &str) -> Arc<dyn ConnectionStore>;

    /// How many random scenarios the property-based test runs. Default 48; stores behind a
    /// network may choose fewer.
    fn proptest_cases(&self) -> u32 {
        48
    }
}

/// Polls `future` once and returns its output, for stores whose operations never wait (in
/// memory): no runtime is needed, so plain threads and benchmarks can call them.
///
/// # Panics
///
/// When the future is not ready at once.
pub fn ready<T>(future: impl std::future::Future<Output = T>) -> T {
    let mut future = std::pin::pin!(future);
    let mut context = std::task::Context::from_waker(std::task::Waker::noop());
    match future.as_mut().poll(&mut context) {
        std::task::Poll::Ready(output) => output,
        std::task::Poll::Pending => {
            panic!("a store operation waited; an in-memory one never should")
        }
    }
}

/// A namespace no other call in this or any concurrently running test process returns.
pub fn unique_namespace() -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    // 'sb' + pid + counter + low bits of the clock: unique per process and across processes.
    format!(
        "sb{:x}x{:x}x{:x}",
        std::process::id(),
        n,
        nanos & 0xffff_ffff
    )
}

/// A user id for tests. Panics on an invalid literal (test code only).
pub fn user(raw: &str) -> UserId {
    UserId::new(raw).unwrap_or_else(|e| panic!("test user id {raw:?}: {e}"))
}

/// A connection id for tests. Panics on an invalid literal (test code only).
pub fn conn(raw: &str) -> ConnectionId {
    ConnectionId::new(raw).unwrap_or_else(|e| panic!("test connection id {raw:?}: {e}"))
}

/// A node id for tests. Panics on an invalid literal (test code only).
pub fn node(raw: &str) -> NodeId {
    NodeId::new(raw).unwrap_or_else(|e| panic!("test node id {raw:?}: {e}"))
}

/// A fixed point in time the cases measure from (2023-11-14T22:13:20Z).
pub fn t0() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_700_000_000)
}

/// A record for tests: `conn_id` of `user_id` on `node_id`, connected at [`t0`].
pub fn record(conn_id: &str, user_id: &str, node_id: &str) -> ConnectionRecord {
    ConnectionRecord::new(conn(conn_id), user(user_id), node(node_id), t0())
}

/// Expands to one test per conformance case, each running against the harness built by the
/// given expression (evaluated once per test).
///
/// ```ignore
/// switchboard_core::conformance_tests!(switchboard_memory::testing::Harness);
/// ```
#[macro_export]
macro_rules! conformance_tests {
    ($harness:expr) => {
        $crate::conformance_tests!(@async $harness;
            add_and_look_up,
            several_connections_per_user,
            removing_the_last_connection_removes_the_user,
            adding_a_recorded_connection_is_a_conflict,
            reconnect_is_an_idempotent_upsert,
            unknown_removals_are_harmless,
            user_ids_are_normalized_once_and_compared_exactly,
            lookup_matches_capabilities,
            listing_matches_capabilities,
            sweep_removes_only_expired_nodes
        );

        #[test]
        fn concurrent_operations_match_a_sequential_model() {
            let harness = $harness;
            $crate::testkit::cases::concurrent_operations_match_a_sequential_model(&harness);
        }
    };
    (@async $harness:expr; $($case:ident),* $(,)?) => {$(
        #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $case() {
            let harness = $harness;
            $crate::testkit::cases::$case(&harness).await;
        }
    )*};
}
