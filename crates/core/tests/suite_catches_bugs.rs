//! The conformance suite tested on itself: the reference store passes every case, and stores
//! with one deliberate bug each fail the case written for that behaviour.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use switchboard_core::testkit::{Harness, ReferenceStore, cases};
use switchboard_core::{
    Capabilities, ConnectionId, ConnectionRecord, ConnectionStore, Counts, Lease, NodeId,
    OrphanCleanup, PageRequest, Removal, Speed, StoreError, UserId, UserListing, UserPage,
    async_trait,
};

switchboard_core::conformance_tests!(Reference);

struct Reference;

#[async_trait]
impl Harness for Reference {
    async fn store(&self, _namespace: &str) -> Arc<dyn ConnectionStore> {
        Arc::new(ReferenceStore::new())
    }
}

/// One deliberate bug each.
#[derive(Debug, Clone, Copy)]
enum Bug {
    /// Forgets to delete users whose last connection went away.
    KeepsEmptyUsers,
    /// Claims it can list users, then answers with nothing.
    ClaimsListingButAnswersEmpty,
    /// Sweeps every node, leased or not.
    SweepsLiveNodes,
    /// `reconnect` leaves an existing record untouched.
    ReconnectKeepsStaleRecord,
    /// Lower-cases the user on add but not elsewhere (the classic Azure sample bug).
    LowercasesOnAddOnly,
    /// Removes a connection even when asked under the wrong user.
    RemovesUnderWrongUser,
    /// Claims to be shared across nodes, but every instance has its own records.
    ClaimsSharedButSeparate,
    /// Claims its records survive a restart, but a reopened store is empty.
    ClaimsSurvivesRestart,
    /// Claims records outlive their node (`LeaseSweep`) without offering leases.
    LeaseSweepWithoutLeases,
    /// Claims to run in-process, but `counts` waits once before answering.
    ClaimsInProcessButWaits,
    /// Expires leases only when sweeping: lookups show the records of expired nodes.
    ShowsExpiredLeases,
    /// `release` removes the records of every node, not just the released one.
    ReleaseRemovesOtherNodes,
    /// `heartbeat` always answers `Renewed`.
    HeartbeatAlwaysRenewed,
    /// Pages of users ignore the name prefix.
    IgnoresPrefix,
    /// Counts per node leave out the last node.
    DropsANodeCount,
    /// Claims `speed = Network`, with the outage its harness offers.
    Network(Outage),
}

/// What [`BrokenHarness::unreachable`] hands out for a `Network` store.
#[derive(Debug, Clone, Copy)]
enum Outage {
    /// Nothing: the harness does not implement `unreachable`.
    NotProvided,
    /// A store that works (it answers as if it had data).
    AnswersOk,
    /// A store whose operations never finish.
    Hangs,
    /// A store that fails with a permanent error.
    FailsPermanently,
    /// The correct behaviour: every operation fails with `Unavailable`.
    FailsTransiently,
}

#[derive(Debug)]
struct Broken {
    inner: ReferenceStore,
    bug: Bug,
    ever_seen: Mutex<BTreeSet<UserId>>,
    /// For [`Bug::ShowsExpiredLeases`]: the leases as the nodes asked for them; the inner
    /// store is given leases that never run out.
    leases: Mutex<BTreeMap<NodeId, Instant>>,
}

impl Broken {
    fn new(bug: Bug) -> Self {
        Self {
            inner: ReferenceStore::new(),
            bug,
            ever_seen: Mutex::default(),
            leases: Mutex::default(),
        }
    }

    fn seen(&self) -> BTreeSet<UserId> {
        self.ever_seen.lock().expect("lock").clone()
    }

    /// Removes every visible connection of every user ever seen, whatever its node.
    async fn remove_everything(&self) -> Result<u64, StoreError> {
        let mut removed = 0;
        for user in self.seen() {
            for r in self.inner.connections(&user).await? {
                if self.inner.remove(&user, r.id()).await? == Removal::Removed {
                    removed += 1;
                }
            }
        }
        Ok(removed)
    }
}

#[async_trait]
impl ConnectionStore for Broken {
    fn capabilities(&self) -> Capabilities {
        let mut caps = self.inner.capabilities();
        caps.strategy = "broken";
        match self.bug {
            Bug::ClaimsListingButAnswersEmpty => caps.list_users = UserListing::Indexed,
            Bug::ClaimsSharedButSeparate => caps.shared_across_nodes = true,
            Bug::ClaimsSurvivesRestart => {
                caps.survives_restart = true;
                caps.orphan_cleanup = OrphanCleanup::LeaseSweep;
            }
            Bug::LeaseSweepWithoutLeases => {
                caps.orphan_cleanup = OrphanCleanup::LeaseSweep;
                caps.leases = false;
            }
            Bug::Network(_) => caps.speed = Speed::Network,
            _ => {}
        }
        caps
    }

    async fn add(&self, record: ConnectionRecord) -> Result<(), StoreError> {
        self.ever_seen
            .lock()
            .expect("lock")
            .insert(record.user().clone());
        let record = match self.bug {
            Bug::LowercasesOnAddOnly => ConnectionRecord::new(
                record.id().clone(),
                UserId::new(&record.user().as_str().to_lowercase()).expect("valid"),
                record.node().clone(),
                record.connected_at(),
            ),
            _ => record,
        };
        self.inner.add(record).await
    }

    async fn remove(&self, user: &UserId, id: &ConnectionId) -> Result<Removal, StoreError> {
        if let Bug::RemovesUnderWrongUser = self.bug {
            let mut outcome = Removal::NotFound;
            for owner in self.seen() {
                if self.inner.remove(&owner, id).await? == Removal::Removed && &owner == user {
                    outcome = Removal::Removed;
                }
            }
            return Ok(outcome);
        }
        self.inner.remove(user, id).await
    }

    async fn reconnect(&self, record: ConnectionRecord) -> Result<(), StoreError> {
        self.ever_seen
            .lock()
            .expect("lock")
            .insert(record.user().clone());
        if let Bug::ReconnectKeepsStaleRecord = self.bug {
            let existing = self.inner.connections(record.user()).await?;
            if existing.iter().any(|r| r.id() == record.id()) {
                return Ok(());
            }
        }
        self.inner.reconnect(record).await
    }

    async fn connections(&self, user: &UserId) -> Result<Vec<ConnectionRecord>, StoreError> {
        self.inner.connections(user).await
    }

    async fn users(&self, page: PageRequest) -> Result<UserPage, StoreError> {
        match self.bug {
            Bug::KeepsEmptyUsers => Ok(UserPage {
                users: self.seen().into_iter().collect(),
                next: None,
            }),
            Bug::ClaimsListingButAnswersEmpty => Ok(UserPage::default()),
            Bug::IgnoresPrefix => {
                self.inner
                    .users(PageRequest {
                        prefix: None,
                        ..page
                    })
                    .await
            }
            _ => self.inner.users(page).await,
        }
    }

    async fn counts_by_node(&self) -> Result<BTreeMap<NodeId, u64>, StoreError> {
        let mut counts = self.inner.counts_by_node().await?;
        if let Bug::DropsANodeCount = self.bug {
            counts.pop_last();
        }
        Ok(counts)
    }

    async fn counts(&self) -> Result<Counts, StoreError> {
        if let Bug::ClaimsInProcessButWaits = self.bug {
            tokio::task::yield_now().await;
        }
        let mut counts = self.inner.counts().await?;
        if let Bug::KeepsEmptyUsers = self.bug {
            counts.users = self.seen().len() as u64;
        }
        Ok(counts)
    }

    async fn heartbeat(&self, node: &NodeId, ttl: Duration) -> Result<Lease, StoreError> {
        match self.bug {
            Bug::HeartbeatAlwaysRenewed => {
                let _ = self.inner.heartbeat(node, ttl).await?;
                Ok(Lease::Renewed)
            }
            Bug::ShowsExpiredLeases => {
                let _ = self.inner.heartbeat(node, Lease::MAX_TTL).await?;
                let now = Instant::now();
                let previous = self
                    .leases
                    .lock()
                    .expect("lock")
                    .insert(node.clone(), now + ttl);
                Ok(match previous {
                    None => Lease::Taken,
                    Some(expires) if expires > now => Lease::Renewed,
                    Some(_) => Lease::Lapsed,
                })
            }
            _ => self.inner.heartbeat(node, ttl).await,
        }
    }

    async fn sweep(&self) -> Result<u64, StoreError> {
        match self.bug {
            Bug::SweepsLiveNodes => Ok(self.remove_everything().await? + self.inner.sweep().await?),
            Bug::ShowsExpiredLeases => {
                let now = Instant::now();
                let expired: Vec<NodeId> = {
                    let mut leases = self.leases.lock().expect("lock");
                    let expired = leases
                        .iter()
                        .filter(|(_, expires)| **expires <= now)
                        .map(|(node, _)| node.clone())
                        .collect();
                    leases.retain(|_, expires| *expires > now);
                    expired
                };
                let mut removed = self.inner.sweep().await?;
                for node in &expired {
                    removed += self.inner.release(node).await?;
                }
                Ok(removed)
            }
            _ => self.inner.sweep().await,
        }
    }

    async fn release(&self, node: &NodeId) -> Result<u64, StoreError> {
        match self.bug {
            Bug::ReleaseRemovesOtherNodes => {
                let mine = self.inner.release(node).await?;
                let _ = self.remove_everything().await?;
                Ok(mine)
            }
            Bug::ShowsExpiredLeases => {
                self.leases.lock().expect("lock").remove(node);
                self.inner.release(node).await
            }
            _ => self.inner.release(node).await,
        }
    }
}

/// A store whose backend is down: every operation fails (transiently or not).
#[derive(Debug)]
struct Down {
    transient: bool,
}

impl Down {
    fn fail<T>(&self) -> Result<T, StoreError> {
        Err(if self.transient {
            StoreError::Unavailable {
                message: "connection refused".into(),
                source: None,
            }
        } else {
            StoreError::Backend {
                message: "connection refused".into(),
                transient: false,
                source: None,
            }
        })
    }
}

#[async_trait]
impl ConnectionStore for Down {
    fn capabilities(&self) -> Capabilities {
        Broken::new(Bug::Network(Outage::FailsTransiently)).capabilities()
    }
    async fn add(&self, _record: ConnectionRecord) -> Result<(), StoreError> {
        self.fail()
    }
    async fn remove(&self, _user: &UserId, _id: &ConnectionId) -> Result<Removal, StoreError> {
        self.fail()
    }
    async fn reconnect(&self, _record: ConnectionRecord) -> Result<(), StoreError> {
        self.fail()
    }
    async fn connections(&self, _user: &UserId) -> Result<Vec<ConnectionRecord>, StoreError> {
        self.fail()
    }
    async fn users(&self, _page: PageRequest) -> Result<UserPage, StoreError> {
        self.fail()
    }
    async fn counts(&self) -> Result<Counts, StoreError> {
        self.fail()
    }
    async fn heartbeat(&self, _node: &NodeId, _ttl: Duration) -> Result<Lease, StoreError> {
        self.fail()
    }
    async fn sweep(&self) -> Result<u64, StoreError> {
        self.fail()
    }
    async fn release(&self, _node: &NodeId) -> Result<u64, StoreError> {
        self.fail()
    }
}

/// A store whose every operation waits forever (a backend that never answers).
#[derive(Debug)]
struct Hanging;

#[async_trait]
impl ConnectionStore for Hanging {
    fn capabilities(&self) -> Capabilities {
        Broken::new(Bug::Network(Outage::Hangs)).capabilities()
    }
    async fn add(&self, _record: ConnectionRecord) -> Result<(), StoreError> {
        std::future::pending().await
    }
    async fn remove(&self, _user: &UserId, _id: &ConnectionId) -> Result<Removal, StoreError> {
        std::future::pending().await
    }
    async fn reconnect(&self, _record: ConnectionRecord) -> Result<(), StoreError> {
        std::future::pending().await
    }
}

struct BrokenHarness(Bug);

#[async_trait]
impl Harness for BrokenHarness {
    async fn store(&self, _namespace: &str) -> Arc<dyn ConnectionStore> {
        Arc::new(Broken::new(self.0))
    }

    async fn unreachable(&self) -> Option<Arc<dyn ConnectionStore>> {
        let Bug::Network(outage) = self.0 else {
            return None;
        };
        match outage {
            Outage::NotProvided => None,
            Outage::AnswersOk => Some(Arc::new(ReferenceStore::new())),
            Outage::Hangs => Some(Arc::new(Hanging)),
            Outage::FailsPermanently => Some(Arc::new(Down { transient: false })),
            Outage::FailsTransiently => Some(Arc::new(Down { transient: true })),
        }
    }

    /// About one random scenario in 25 exposes a store that forgets empty users, so the
    /// default 48 miss it now and then; 512 miss it about once in a billion runs.
    fn proptest_cases(&self) -> u32 {
        512
    }
}

/// Runs a case in its own task and asserts that it failed.
async fn assert_fails<F>(case: &str, run: F)
where
    F: Future<Output = ()> + Send + 'static,
{
    match tokio::spawn(run).await {
        Err(e) if e.is_panic() => {}
        other => panic!("the case `{case}` should have caught the bug, got {other:?}"),
    }
}

macro_rules! catches {
    ($name:ident, $bug:expr, $case:ident) => {
        catches!($name, $bug, $case, ::tokio::test);
    };
    ($name:ident, $bug:expr, $case:ident, $($test:tt)+) => {
        #[$($test)+]
        async fn $name() {
            assert_fails(stringify!($case), async {
                cases::$case(&BrokenHarness($bug)).await
            })
            .await;
        }
    };
}

catches!(
    a_store_that_forgets_empty_users_fails,
    Bug::KeepsEmptyUsers,
    removing_the_last_connection_removes_the_user
);
catches!(
    a_store_that_claims_listing_but_cannot_fails,
    Bug::ClaimsListingButAnswersEmpty,
    listing_matches_capabilities
);
catches!(
    a_store_that_ignores_the_prefix_fails,
    Bug::IgnoresPrefix,
    prefix_pages_and_node_counts_match_capabilities
);
catches!(
    a_store_that_miscounts_nodes_fails,
    Bug::DropsANodeCount,
    prefix_pages_and_node_counts_match_capabilities
);
catches!(
    a_store_that_sweeps_live_nodes_fails,
    Bug::SweepsLiveNodes,
    sweep_removes_only_expired_nodes
);
catches!(
    a_store_whose_reconnect_is_not_an_upsert_fails,
    Bug::ReconnectKeepsStaleRecord,
    reconnect_is_an_idempotent_upsert
);
catches!(
    a_store_that_normalizes_on_add_only_fails,
    Bug::LowercasesOnAddOnly,
    user_ids_are_normalized_once_and_compared_exactly
);
catches!(
    a_store_that_removes_under_the_wrong_user_fails,
    Bug::RemovesUnderWrongUser,
    unknown_removals_are_harmless
);
catches!(
    a_store_that_claims_sharing_but_keeps_instances_apart_fails,
    Bug::ClaimsSharedButSeparate,
    instances_on_one_namespace_share_records_as_claimed
);
catches!(
    a_store_that_claims_to_survive_restarts_but_forgets_fails,
    Bug::ClaimsSurvivesRestart,
    records_survive_a_restart_as_claimed
);
catches!(
    a_store_with_lease_sweep_but_no_leases_fails,
    Bug::LeaseSweepWithoutLeases,
    capabilities_are_consistent
);
catches!(
    a_store_that_claims_in_process_but_waits_fails,
    Bug::ClaimsInProcessButWaits,
    in_process_stores_never_wait
);
catches!(
    a_store_whose_lookups_show_expired_leases_fails,
    Bug::ShowsExpiredLeases,
    lookups_ignore_nodes_whose_lease_expired
);
catches!(
    a_store_whose_release_removes_other_nodes_fails,
    Bug::ReleaseRemovesOtherNodes,
    release_removes_exactly_the_nodes_records
);
catches!(
    a_store_whose_heartbeat_always_renews_fails,
    Bug::HeartbeatAlwaysRenewed,
    heartbeat_answers_what_it_found
);
catches!(
    a_network_store_without_an_unreachable_harness_fails,
    Bug::Network(Outage::NotProvided),
    an_unreachable_store_fails_transiently
);
catches!(
    an_unreachable_store_that_answers_fails,
    Bug::Network(Outage::AnswersOk),
    an_unreachable_store_fails_transiently
);
catches!(
    an_unreachable_store_that_fails_permanently_fails,
    Bug::Network(Outage::FailsPermanently),
    an_unreachable_store_fails_transiently
);
// On paused time, so the case's deadline passes at once.
catches!(
    an_unreachable_store_that_hangs_fails,
    Bug::Network(Outage::Hangs),
    an_unreachable_store_fails_transiently,
    ::tokio::test(start_paused = true)
);

#[tokio::test]
async fn an_unreachable_store_that_fails_transiently_passes() {
    cases::an_unreachable_store_fails_transiently(&BrokenHarness(Bug::Network(
        Outage::FailsTransiently,
    )))
    .await;
}

#[test]
fn the_property_test_catches_a_store_that_forgets_empty_users() {
    let outcome = std::panic::catch_unwind(|| {
        cases::concurrent_operations_match_a_sequential_model(|| {
            BrokenHarness(Bug::KeepsEmptyUsers)
        })
    });
    assert!(outcome.is_err(), "the property test should have failed");
}
