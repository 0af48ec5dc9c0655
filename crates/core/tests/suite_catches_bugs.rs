//! The conformance suite tested on itself: the reference store passes every case, and stores
//! with one deliberate bug each fail the case written for that behaviour.

use std::collections::BTreeSet;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use switchboard_core::testkit::{Harness, ReferenceStore, cases};
use switchboard_core::{
    Capabilities, ConnectionId, ConnectionRecord, ConnectionStore, Counts, NodeId, PageRequest,
    Removal, StoreError, UserId, UserListing, UserPage, async_trait,
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
}

#[derive(Debug)]
struct Broken {
    inner: ReferenceStore,
    bug: Bug,
    ever_seen: Mutex<BTreeSet<UserId>>,
}

impl Broken {
    fn seen(&self) -> BTreeSet<UserId> {
        self.ever_seen.lock().expect("lock").clone()
    }
}

#[async_trait]
impl ConnectionStore for Broken {
    fn capabilities(&self) -> Capabilities {
        let mut caps = self.inner.capabilities();
        caps.strategy = "broken";
        if let Bug::ClaimsListingButAnswersEmpty = self.bug {
            caps.list_users = UserListing::Indexed;
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
            _ => self.inner.users(page).await,
        }
    }

    async fn counts(&self) -> Result<Counts, StoreError> {
        let mut counts = self.inner.counts().await?;
        if let Bug::KeepsEmptyUsers = self.bug {
            counts.users = self.seen().len() as u64;
        }
        Ok(counts)
    }

    async fn heartbeat(&self, node: &NodeId, expires_at: SystemTime) -> Result<(), StoreError> {
        self.inner.heartbeat(node, expires_at).await
    }

    async fn sweep(&self, now: SystemTime) -> Result<Vec<ConnectionRecord>, StoreError> {
        match self.bug {
            Bug::SweepsLiveNodes => {
                self.inner
                    .sweep(now + Duration::from_secs(365 * 24 * 3600))
                    .await
            }
            _ => self.inner.sweep(now).await,
        }
    }
}

struct BrokenHarness(Bug);

#[async_trait]
impl Harness for BrokenHarness {
    async fn store(&self, _namespace: &str) -> Arc<dyn ConnectionStore> {
        Arc::new(Broken {
            inner: ReferenceStore::new(),
            bug: self.0,
            ever_seen: Mutex::default(),
        })
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
        #[tokio::test]
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

#[test]
fn the_property_test_catches_a_store_that_forgets_empty_users() {
    let outcome = std::panic::catch_unwind(|| {
        cases::concurrent_operations_match_a_sequential_model(&BrokenHarness(Bug::KeepsEmptyUsers))
    });
    assert!(outcome.is_err(), "the property test should have failed");
}
