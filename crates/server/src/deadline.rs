//! A deadline on every store call: a hung database never hangs a connect or a hub call.

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use switchboard_core::{
    Capabilities, ConnectionId, ConnectionRecord, ConnectionStore, Counts, Lease, NodeId,
    PageRequest, Removal, StoreError, UserId, UserPage,
};

/// Wraps a store so that every call fails with [`StoreError::Timeout`] when it takes longer
/// than the deadline. The hub service puts every store behind one
/// ([`HubOptions::store_timeout`](crate::HubOptions::store_timeout)).
///
/// A call that answers at once (an in-memory store) never arms a timer.
pub(crate) struct WithDeadline {
    inner: Arc<dyn ConnectionStore>,
    limit: Duration,
}

impl WithDeadline {
    pub(crate) fn new(inner: Arc<dyn ConnectionStore>, limit: Duration) -> Self {
        Self { inner, limit }
    }

    async fn run<T>(
        &self,
        call: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        tokio::time::timeout(self.limit, call)
            .await
            .unwrap_or(Err(StoreError::Timeout(self.limit)))
    }
}

impl fmt::Debug for WithDeadline {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WithDeadline")
            .field("store", &self.inner)
            .field("limit", &self.limit)
            .finish()
    }
}

#[async_trait]
impl ConnectionStore for WithDeadline {
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }

    async fn add(&self, record: ConnectionRecord) -> Result<(), StoreError> {
        self.run(self.inner.add(record)).await
    }

    async fn remove(&self, user: &UserId, id: &ConnectionId) -> Result<Removal, StoreError> {
        self.run(self.inner.remove(user, id)).await
    }

    async fn reconnect(&self, record: ConnectionRecord) -> Result<(), StoreError> {
        self.run(self.inner.reconnect(record)).await
    }

    async fn connections(&self, user: &UserId) -> Result<Vec<ConnectionRecord>, StoreError> {
        self.run(self.inner.connections(user)).await
    }

    async fn users(&self, page: PageRequest) -> Result<UserPage, StoreError> {
        self.run(self.inner.users(page)).await
    }

    async fn counts(&self) -> Result<Counts, StoreError> {
        self.run(self.inner.counts()).await
    }

    async fn counts_by_node(&self) -> Result<BTreeMap<NodeId, u64>, StoreError> {
        self.run(self.inner.counts_by_node()).await
    }

    async fn heartbeat(&self, node: &NodeId, ttl: Duration) -> Result<Lease, StoreError> {
        self.run(self.inner.heartbeat(node, ttl)).await
    }

    async fn sweep(&self) -> Result<u64, StoreError> {
        self.run(self.inner.sweep()).await
    }

    async fn release(&self, node: &NodeId) -> Result<u64, StoreError> {
        self.run(self.inner.release(node)).await
    }
}

#[cfg(test)]
mod tests {
    use switchboard_core::testkit::{ReferenceStore, record, user};

    use super::*;

    /// A store whose every call hangs.
    #[derive(Debug)]
    struct Hung;

    #[async_trait]
    impl ConnectionStore for Hung {
        fn capabilities(&self) -> Capabilities {
            ReferenceStore::new().capabilities()
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
        async fn connections(&self, _user: &UserId) -> Result<Vec<ConnectionRecord>, StoreError> {
            std::future::pending().await
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_hung_store_call_times_out_as_a_transient_error() {
        let store = WithDeadline::new(Arc::new(Hung), Duration::from_secs(5));
        let err = store
            .connections(&user("ann"))
            .await
            .expect_err("times out");
        assert!(matches!(err, StoreError::Timeout(d) if d == Duration::from_secs(5)));
        assert!(err.is_transient());
        let err = store
            .add(record("c1", "ann", "n"))
            .await
            .expect_err("times out");
        assert!(matches!(err, StoreError::Timeout(_)));
    }

    #[tokio::test]
    async fn answers_within_the_deadline_pass_through() {
        let store = WithDeadline::new(Arc::new(ReferenceStore::new()), Duration::from_secs(5));
        store.add(record("c1", "ann", "n")).await.expect("added");
        assert_eq!(store.connections(&user("ann")).await.expect("ok").len(), 1);
    }
}
