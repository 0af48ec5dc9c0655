//! The conformance suite every [`Backplane`] must pass.
//!
//! A backplane crate runs the whole suite with one line in its
//! `tests/backplane_conformance.rs`:
//!
//! ```ignore
//! switchboard_core::backplane_conformance_tests!(MyHarness::new());
//! ```
//!
//! The macro expands to one test per behaviour (see [`backplane_cases`](super::backplane_cases),
//! listed in [`BACKPLANE_CASES`]). Every case asks the harness for the endpoints of a few
//! nodes under a fresh namespace ([`BackplaneHarness::backplanes`]), starts them, and checks
//! what each node's inbox receives. Endpoints of one namespace reach each other and nothing
//! else, so suites of different backplanes can share one real broker. After each case,
//! whether it passed or panicked, the harness gets [`BackplaneHarness::cleanup`] for every
//! namespace the case used. The calling crate needs `tokio` (with the `macros` and
//! `rt-multi-thread` features) as a dev-dependency.
//!
//! No case waits by sleeping alone: a case publishes its messages, then a marker to every
//! node, waits until each node has its marker, and only then waits for a quiet period
//! ([`BackplaneHarness::quiet_period`]) before counting. Every wait has a bound, so a broken
//! backplane fails a case instead of hanging it.
//!
//! [`MemoryBusHarness`] runs the suite against [`MemoryBus`] endpoints.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;

use super::MemoryBus;
use crate::backplane::Backplane;

/// Builds the backplanes the conformance suite runs against.
#[async_trait]
pub trait BackplaneHarness: Send + Sync {
    /// `nodes` fresh, not yet started endpoints that share one namespace: a message published
    /// on one reaches the others, and no endpoint of another namespace. `namespace` is unique
    /// per case: 3 to 40 characters, lowercase ASCII letters and digits, starting with a
    /// letter (usable as a channel prefix or a stream name).
    async fn backplanes(&self, namespace: &str, nodes: usize) -> Vec<Arc<dyn Backplane>>;

    /// Releases what `namespace` used on the broker. Called after every case, whether it
    /// passed or panicked, for each namespace it asked for. Does nothing unless overridden.
    async fn cleanup(&self, namespace: &str) {
        let _ = namespace;
    }

    /// An endpoint whose broker cannot be reached (a closed port, a stopped container), for
    /// the case that checks failures are transient and bounded. `None` (the default) skips
    /// that case.
    async fn unreachable(&self) -> Option<Arc<dyn Backplane>> {
        None
    }

    /// How long a node must receive nothing more, once its marker arrived, before a case
    /// counts what it received. Default 100 ms; backplanes behind a network may choose more.
    fn quiet_period(&self) -> Duration {
        Duration::from_millis(100)
    }
}

/// A [`BackplaneHarness`] over [`MemoryBus`]: one bus per namespace, so the endpoints of one
/// case share a bus and cases never see each other. Its unreachable backplane is an endpoint
/// of a bus that is [down](MemoryBus::set_down).
#[derive(Debug, Default)]
pub struct MemoryBusHarness {
    buses: Mutex<HashMap<String, MemoryBus>>,
}

impl MemoryBusHarness {
    /// A harness with no buses yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// The bus of `namespace`, if a case asked for it and it was not cleaned up yet.
    pub fn bus(&self, namespace: &str) -> Option<MemoryBus> {
        self.buses
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(namespace)
            .cloned()
    }
}

#[async_trait]
impl BackplaneHarness for MemoryBusHarness {
    async fn backplanes(&self, namespace: &str, nodes: usize) -> Vec<Arc<dyn Backplane>> {
        let bus = self
            .buses
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(namespace.to_owned())
            .or_default()
            .clone();
        (0..nodes).map(|_| bus.endpoint()).collect()
    }

    async fn cleanup(&self, namespace: &str) {
        self.buses
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(namespace);
    }

    async fn unreachable(&self) -> Option<Arc<dyn Backplane>> {
        let bus = MemoryBus::new();
        bus.set_down(true);
        Some(bus.endpoint())
    }
}

/// A case as [`run_case`] takes it.
pub type Case = for<'a> fn(&'a dyn BackplaneHarness) -> CaseFuture<'a>;

/// The future of one case.
pub type CaseFuture<'a> = Pin<Box<dyn Future<Output = ()> + Send + 'a>>;

/// Remembers the namespaces a case asked for, so they can be cleaned up after it.
struct Tracked<H> {
    inner: H,
    namespaces: Mutex<Vec<String>>,
}

#[async_trait]
impl<H: BackplaneHarness> BackplaneHarness for Tracked<H> {
    async fn backplanes(&self, namespace: &str, nodes: usize) -> Vec<Arc<dyn Backplane>> {
        self.namespaces
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(namespace.to_owned());
        self.inner.backplanes(namespace, nodes).await
    }

    async fn cleanup(&self, namespace: &str) {
        self.inner.cleanup(namespace).await;
    }

    async fn unreachable(&self) -> Option<Arc<dyn Backplane>> {
        self.inner.unreachable().await
    }

    fn quiet_period(&self) -> Duration {
        self.inner.quiet_period()
    }
}

/// Runs one case against `harness` in its own task, then cleans up every namespace the case
/// used, and panics with the case's panic if it failed. What
/// [`backplane_conformance_tests!`](crate::backplane_conformance_tests) expands to.
///
/// # Panics
///
/// When the case fails.
pub async fn run_case<H: BackplaneHarness + 'static>(harness: H, case: Case) {
    let tracked = Arc::new(Tracked {
        inner: harness,
        namespaces: Mutex::new(Vec::new()),
    });
    let running = Arc::clone(&tracked);
    let outcome = tokio::spawn(async move { case(&*running).await }).await;
    let namespaces = std::mem::take(
        &mut *tracked
            .namespaces
            .lock()
            .unwrap_or_else(PoisonError::into_inner),
    );
    for namespace in namespaces {
        tracked.inner.cleanup(&namespace).await;
    }
    if let Err(e) = outcome {
        match e.try_into_panic() {
            Ok(panic) => std::panic::resume_unwind(panic),
            Err(e) => panic!("the case did not finish: {e}"),
        }
    }
}

/// Expands to one test per backplane conformance case, each running against the harness
/// built by the given expression (evaluated once per test).
///
/// ```ignore
/// switchboard_core::backplane_conformance_tests!(switchboard_core::testkit::MemoryBusHarness::new());
/// ```
#[macro_export]
macro_rules! backplane_conformance_tests {
    ($harness:expr) => {
        $crate::backplane_conformance_tests!(@list tests [$harness]);
    };
    // The one list of cases; `BACKPLANE_CASES` is built from it too.
    (@list $mode:ident [$($arg:tt)*]) => {
        $crate::backplane_conformance_tests! { @$mode [$($arg)*]
            started_backplanes_are_healthy,
            node_messages_reach_only_their_node,
            channel_messages_reach_every_subscriber_once,
            subscribe_and_unsubscribe_are_idempotent,
            messages_from_one_sender_arrive_in_order,
            every_field_round_trips,
            payloads_over_the_limit_are_too_large,
            hostile_names_do_not_cross_talk,
            unsupported_addresses_match_capabilities,
            an_unreachable_backplane_fails_transiently,
            nothing_arrives_after_stop,
            publish_reports_its_reach_as_claimed,
        }
    };
    (@tests [$harness:expr] $($case:ident),* $(,)?) => {$(
        #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $case() {
            fn case(
                harness: &dyn $crate::testkit::BackplaneHarness,
            ) -> $crate::testkit::backplane_suite::CaseFuture<'_> {
                ::std::boxed::Box::pin($crate::testkit::backplane_cases::$case(harness))
            }
            $crate::testkit::backplane_suite::run_case($harness, case).await;
        }
    )*};
    (@names [] $($case:ident),* $(,)?) => {
        &[$(stringify!($case)),*]
    };
}

/// The names of the cases [`backplane_conformance_tests!`](crate::backplane_conformance_tests)
/// runs, in order: one per `pub async fn` in [`backplane_cases`](super::backplane_cases).
pub const BACKPLANE_CASES: &[&str] = crate::backplane_conformance_tests!(@list names []);

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    #[test]
    fn the_macro_runs_every_case() {
        let source = include_str!("backplane_cases.rs");
        let defined: BTreeSet<&str> = source
            .lines()
            .filter_map(|line| line.strip_prefix("pub async fn "))
            .filter_map(|rest| rest.split('(').next())
            .collect();
        let listed: BTreeSet<&str> = BACKPLANE_CASES.iter().copied().collect();
        assert_eq!(
            listed.len(),
            BACKPLANE_CASES.len(),
            "a case is listed twice"
        );
        assert!(defined.len() >= 10, "{defined:?}");
        assert_eq!(
            defined, listed,
            "backplane_cases.rs and the macro's list differ"
        );
    }

    /// Counts cleanups, over a memory bus.
    struct Counting {
        inner: Arc<MemoryBusHarness>,
        cleaned: Arc<Mutex<Vec<String>>>,
    }

    #[async_trait]
    impl BackplaneHarness for Counting {
        async fn backplanes(&self, namespace: &str, nodes: usize) -> Vec<Arc<dyn Backplane>> {
            self.inner.backplanes(namespace, nodes).await
        }

        async fn cleanup(&self, namespace: &str) {
            self.inner.cleanup(namespace).await;
            self.cleaned
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(namespace.to_owned());
        }
    }

    fn failing(harness: &dyn BackplaneHarness) -> CaseFuture<'_> {
        Box::pin(async move {
            harness.backplanes("first", 1).await;
            harness.backplanes("second", 2).await;
            panic!("the case failed");
        })
    }

    fn passing(harness: &dyn BackplaneHarness) -> CaseFuture<'_> {
        Box::pin(async move {
            let planes = harness.backplanes("third", 1).await;
            assert_eq!(planes.len(), 1);
        })
    }

    #[tokio::test]
    async fn every_namespace_is_cleaned_up_even_when_a_case_fails() {
        let buses = Arc::new(MemoryBusHarness::new());
        let cleaned = Arc::new(Mutex::new(Vec::new()));
        let harness = Counting {
            inner: Arc::clone(&buses),
            cleaned: Arc::clone(&cleaned),
        };
        let outcome = tokio::spawn(run_case(harness, failing)).await;
        let panic = outcome
            .expect_err("the case's panic is passed on")
            .into_panic();
        assert_eq!(panic.downcast_ref::<&str>(), Some(&"the case failed"));
        assert_eq!(*cleaned.lock().expect("lock"), ["first", "second"]);
        assert!(buses.bus("first").is_none() && buses.bus("second").is_none());

        let harness = Counting {
            inner: Arc::clone(&buses),
            cleaned: Arc::clone(&cleaned),
        };
        run_case(harness, passing).await;
        assert_eq!(*cleaned.lock().expect("lock"), ["first", "second", "third"]);
    }
}
