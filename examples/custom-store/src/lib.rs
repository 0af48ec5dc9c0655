//! A connection store of your own: [`LimitedStore`] refuses more than a set number of live
//! connections per user, and delegates everything else to another store.
//!
//! Anything that implements [`ConnectionStore`] can be served by Switchboard. Run the shared
//! conformance suite against it (see `tests/conformance.rs`) to know it keeps the contract.

use std::sync::Arc;
use std::time::Duration;

use switchboard_core::{
    Capabilities, ConnectionId, ConnectionRecord, ConnectionStore, Counts, Lease, NodeId,
    PageRequest, Removal, StoreError, UserId, UserPage, async_trait,
};

/// Wraps a store and refuses a user's connection beyond `limit` live ones.
///
/// The check and the insert are two steps, so under concurrent connects of one user the limit
/// can be exceeded by the number of racing connects; a store with transactions would do both
/// in one. Same capabilities as the wrapped store.
#[derive(Debug)]
pub struct LimitedStore {
    inner: Arc<dyn ConnectionStore>,
    limit: usize,
}

impl LimitedStore {
    /// At most `limit` live connections per user in `inner`.
    pub fn new(inner: Arc<dyn ConnectionStore>, limit: usize) -> Self {
        Self { inner, limit }
    }
}

#[async_trait]
impl ConnectionStore for LimitedStore {
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }

    async fn add(&self, record: ConnectionRecord) -> Result<(), StoreError> {
        let live = self.inner.connections(record.user()).await?.len();
        if live >= self.limit {
            // A policy refusal, not an outage: the client is told why and is not invited to
            // retry, because retrying gets the same answer until a connection closes.
            return Err(StoreError::refused(format!(
                "you already have {live} open connections; at most {} are allowed",
                self.limit
            )));
        }
        self.inner.add(record).await
    }

    async fn remove(&self, user: &UserId, id: &ConnectionId) -> Result<Removal, StoreError> {
        self.inner.remove(user, id).await
    }

    async fn reconnect(&self, record: ConnectionRecord) -> Result<(), StoreError> {
        self.inner.reconnect(record).await
    }

    async fn connections(&self, user: &UserId) -> Result<Vec<ConnectionRecord>, StoreError> {
        self.inner.connections(user).await
    }

    async fn users(&self, page: PageRequest) -> Result<UserPage, StoreError> {
        self.inner.users(page).await
    }

    async fn counts(&self) -> Result<Counts, StoreError> {
        self.inner.counts().await
    }

    async fn counts_by_node(&self) -> Result<std::collections::BTreeMap<NodeId, u64>, StoreError> {
        self.inner.counts_by_node().await
    }

    async fn heartbeat(&self, node: &NodeId, ttl: Duration) -> Result<Lease, StoreError> {
        self.inner.heartbeat(node, ttl).await
    }

    async fn sweep(&self) -> Result<u64, StoreError> {
        self.inner.sweep().await
    }

    async fn release(&self, node: &NodeId) -> Result<u64, StoreError> {
        self.inner.release(node).await
    }
}
