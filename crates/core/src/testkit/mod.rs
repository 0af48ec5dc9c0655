//! The conformance suite every [`ConnectionStore`] must pass.
//!
//! A store crate runs the whole suite with one line in its `tests/conformance.rs`:
//!
//! ```ignore
//! switchboard_core::conformance_tests!(MyHarness::new());
//! ```
//!
//! The macro expands to one test per behaviour (see [`cases`]; their names are [`CASES`]) and
//! the property-based test. The calling crate needs `tokio` (with the `macros` and
//! `rt-multi-thread` features) as a dev-dependency.
//!
//! # Harnesses
//!
//! A [`Harness`] opens stores the way starting server processes would. Each case picks fresh
//! namespaces ([`unique_namespace`]: use them as a table name, key prefix or partition), so
//! suites of different stores, and cases running in parallel, can share one real database.
//! A case that opens a namespace twice gets two instances on the same data: that is how the
//! suite plays several nodes, or one node restarting, and holds a store to its
//! [`Capabilities`](crate::Capabilities) (`shared_across_nodes`, `survives_restart`). After
//! every case, whether it passed or panicked, the suite calls [`Harness::cleanup`] for each
//! namespace the case opened.
//!
//! A harness value is built, used and dropped inside one tokio runtime: each async case
//! builds its harness inside its own test runtime, and the property-based test builds one
//! runtime and runs all its scenarios in it. So a harness may keep a connection pool, opened
//! lazily by [`Harness::store`], for as long as it lives.
//!
//! Stores behind a network must also provide [`Harness::unreachable`], a store whose backend
//! cannot be reached, so the suite can check that outages fail fast and transiently.
//!
//! [`ReferenceStore`] is the suite's sequential model written as a store: obviously correct,
//! slow, single-lock. It passes the suite and doubles as a fake in unit tests.

pub mod backplane_cases;
pub mod backplane_suite;
mod bus;
pub mod cases;
mod reference;
pub mod workload;

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use futures_util::FutureExt as _;

use crate::{ConnectionId, ConnectionRecord, ConnectionStore, NodeId, UserId};

pub use backplane_suite::{BACKPLANE_CASES, BackplaneHarness, MemoryBusHarness};
pub use bus::MemoryBus;
pub use reference::ReferenceStore;

/// Opens the stores the conformance suite runs against.
///
/// See the [module docs](self#harnesses) for how the suite uses a harness.
#[async_trait]
pub trait Harness: Send + Sync {
    /// Opens a store instance on `namespace` as a starting server process would.
    ///
    /// Calling it again with the same namespace opens ANOTHER instance on the same data:
    /// another node, or the same node after a restart (the earlier instance may have been
    /// dropped). A store whose records live in its instance's memory (not shared across nodes,
    /// not surviving restarts) returns a new, empty store each time.
    ///
    /// `namespace` is 3 to 40 characters, lowercase ASCII letters and digits, starting with a
    /// letter (valid as a SQL table name and an Azure table name), and no other case or test
    /// process uses it.
    async fn store(&self, namespace: &str) -> Arc<dyn ConnectionStore>;

    /// Deletes whatever this harness created for `namespace` (tables, keys, partitions). The
    /// suite calls it after every case for each namespace the case opened, also when the case
    /// failed, once the case's store instances are dropped. Default: nothing to delete.
    async fn cleanup(&self, namespace: &str) {
        let _ = namespace;
    }

    /// A store configured like the others but whose backend cannot be reached (for example a
    /// closed port on localhost), or `None` for stores that need no backend. Required when
    /// the store's [`Speed`](crate::Speed) is `Network`: the suite checks that every operation
    /// then fails transiently, and within a bounded time.
    async fn unreachable(&self) -> Option<Arc<dyn ConnectionStore>> {
        None
    }

    /// How many random scenarios the property-based test runs. Default 48; stores behind a
    /// network may choose fewer.
    fn proptest_cases(&self) -> u32 {
        48
    }
}

/// A harness that remembers the namespaces a case opens, so that [`Scope::run`] can clean them
/// up after the case, whether it passed or panicked. The
/// [`conformance_tests!`](crate::conformance_tests) macro runs every case in one.
///
/// ```ignore
/// let scope = Scope::new(&my_harness);
/// scope.run(cases::add_and_look_up(&scope)).await;
/// ```
pub struct Scope<'h> {
    harness: &'h dyn Harness,
    namespaces: Mutex<Vec<String>>,
}

impl<'h> Scope<'h> {
    /// A scope over `harness` that has opened nothing yet.
    pub fn new(harness: &'h dyn Harness) -> Self {
        Self {
            harness,
            namespaces: Mutex::new(Vec::new()),
        }
    }

    /// The namespaces opened through this scope and not cleaned up yet, in the order they
    /// were first opened.
    pub fn namespaces(&self) -> Vec<String> {
        self.namespaces
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Runs `case` to completion (it should open its stores through this scope), then calls
    /// [`Harness::cleanup`] for every namespace it opened, and then returns the case's output,
    /// or resumes its panic.
    pub async fn run<T>(&self, case: impl Future<Output = T>) -> T {
        let outcome = AssertUnwindSafe(case).catch_unwind().await;
        let namespaces = std::mem::take(
            &mut *self
                .namespaces
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        );
        for namespace in &namespaces {
            self.harness.cleanup(namespace).await;
        }
        match outcome {
            Ok(output) => output,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }
}

#[async_trait]
impl Harness for Scope<'_> {
    async fn store(&self, namespace: &str) -> Arc<dyn ConnectionStore> {
        {
            let mut namespaces = self
                .namespaces
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if !namespaces.iter().any(|n| n == namespace) {
                namespaces.push(namespace.to_owned());
            }
        }
        self.harness.store(namespace).await
    }

    async fn cleanup(&self, namespace: &str) {
        self.harness.cleanup(namespace).await;
    }

    async fn unreachable(&self) -> Option<Arc<dyn ConnectionStore>> {
        self.harness.unreachable().await
    }

    fn proptest_cases(&self) -> u32 {
        self.harness.proptest_cases()
    }
}

/// Polls `future` once with a waker that does nothing: its output if it was ready.
pub(crate) fn poll_once<F: Future>(future: F) -> Option<F::Output> {
    let mut future = std::pin::pin!(future);
    let mut context = Context::from_waker(Waker::noop());
    match future.as_mut().poll(&mut context) {
        Poll::Ready(output) => Some(output),
        Poll::Pending => None,
    }
}

/// Polls `future` once and returns its output, for stores whose operations never wait (in
/// memory): no runtime is needed, so plain threads and benchmarks can call them.
///
/// # Panics
///
/// When the future is not ready at once.
pub fn ready<T>(future: impl Future<Output = T>) -> T {
    poll_once(future)
        .unwrap_or_else(|| panic!("a store operation waited; an in-memory one never should"))
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

/// The names of the async conformance cases in [`cases`], in the order the
/// [`conformance_tests!`](crate::conformance_tests) macro runs them (the property-based
/// [`cases::concurrent_operations_match_a_sequential_model`] comes on top).
pub const CASES: &[&str] = crate::__conformance_cases!(names);

/// Expands to one test per conformance case, each running against the harness built by the
/// given expression (evaluated once per test, inside the test's runtime), plus the
/// property-based test.
///
/// ```ignore
/// switchboard_core::conformance_tests!(switchboard_memory::testing::Harness);
/// ```
#[macro_export]
macro_rules! conformance_tests {
    ($harness:expr) => {
        $crate::__conformance_cases!(tests $harness);

        #[test]
        fn concurrent_operations_match_a_sequential_model() {
            $crate::testkit::cases::concurrent_operations_match_a_sequential_model(|| $harness);
        }
    };
}

/// The one list of async conformance cases, expanded into tests ([`conformance_tests!`]) or
/// into their names ([`testkit::CASES`](crate::testkit::CASES)).
#[doc(hidden)]
#[macro_export]
macro_rules! __conformance_cases {
    (@expand [tests $harness:expr] $($case:ident),* $(,)?) => {$(
        #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $case() {
            let harness = $harness;
            let scope = $crate::testkit::Scope::new(&harness);
            scope.run($crate::testkit::cases::$case(&scope)).await;
        }
    )*};
    (@expand [names] $($case:ident),* $(,)?) => {
        &[$(::core::stringify!($case)),*]
    };
    ($($mode:tt)*) => {
        $crate::__conformance_cases! { @expand [$($mode)*]
            add_and_look_up,
            several_connections_per_user,
            removing_the_last_connection_removes_the_user,
            adding_a_recorded_connection_is_a_conflict,
            reconnect_is_an_idempotent_upsert,
            unknown_removals_are_harmless,
            user_ids_are_normalized_once_and_compared_exactly,
            lookup_matches_capabilities,
            listing_matches_capabilities,
            prefix_pages_and_node_counts_match_capabilities,
            capabilities_are_consistent,
            instances_on_one_namespace_share_records_as_claimed,
            records_survive_a_restart_as_claimed,
            in_process_stores_never_wait,
            an_unreachable_store_fails_transiently,
            heartbeat_answers_what_it_found,
            release_removes_exactly_the_nodes_records,
            lookups_ignore_nodes_whose_lease_expired,
            sweep_removes_only_expired_nodes,
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every `pub async fn` in `cases.rs` is run by the macro, and the macro runs nothing else.
    #[test]
    fn the_macro_runs_every_case() {
        let mut defined: Vec<&str> = include_str!("cases.rs")
            .lines()
            .filter_map(|line| line.strip_prefix("pub async fn "))
            .filter_map(|rest| rest.split_once('(').map(|(name, _)| name.trim()))
            .collect();
        defined.sort_unstable();
        let mut listed = CASES.to_vec();
        listed.sort_unstable();
        assert!(!defined.is_empty(), "no cases found in cases.rs");
        assert_eq!(
            defined, listed,
            "cases.rs and the conformance_tests! list differ"
        );
    }

    /// Remembers which namespaces were opened and cleaned up.
    #[derive(Default)]
    struct Counting {
        opened: Mutex<Vec<String>>,
        cleaned: Mutex<Vec<String>>,
    }

    #[async_trait]
    impl Harness for Counting {
        async fn store(&self, namespace: &str) -> Arc<dyn ConnectionStore> {
            self.opened.lock().expect("lock").push(namespace.to_owned());
            Arc::new(ReferenceStore::new())
        }

        async fn cleanup(&self, namespace: &str) {
            self.cleaned
                .lock()
                .expect("lock")
                .push(namespace.to_owned());
        }
    }

    async fn open_twice_then(harness: &dyn Harness, fail: bool) -> u8 {
        let _a = harness.store("nsone").await;
        let _b = harness.store("nsone").await;
        let _c = harness.store("nstwo").await;
        assert!(!fail, "the case failed on purpose");
        7
    }

    #[tokio::test]
    async fn a_scope_cleans_up_every_namespace_once_after_a_case() {
        let harness = Counting::default();
        let scope = Scope::new(&harness);
        assert_eq!(scope.run(open_twice_then(&scope, false)).await, 7);
        assert_eq!(
            *harness.opened.lock().expect("lock"),
            ["nsone", "nsone", "nstwo"]
        );
        assert_eq!(*harness.cleaned.lock().expect("lock"), ["nsone", "nstwo"]);
        assert!(
            scope.namespaces().is_empty(),
            "cleaned namespaces are forgotten"
        );
    }

    #[tokio::test]
    async fn a_scope_cleans_up_after_a_failed_case_and_fails_it() {
        let harness = Counting::default();
        let scope = Scope::new(&harness);
        let outcome = AssertUnwindSafe(scope.run(open_twice_then(&scope, true)))
            .catch_unwind()
            .await;
        let panic = outcome.expect_err("the case's panic goes on after the cleanup");
        assert_eq!(
            panic.downcast_ref::<&str>().copied(),
            Some("the case failed on purpose")
        );
        assert_eq!(*harness.cleaned.lock().expect("lock"), ["nsone", "nstwo"]);
    }

    #[test]
    fn ready_answers_ready_futures_and_refuses_waiting_ones() {
        assert_eq!(ready(async { 3 }), 3);
        assert_eq!(poll_once(std::future::pending::<()>()), None);
    }
}
