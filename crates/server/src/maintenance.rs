//! The node's upkeep in the store: its lease, removals that failed, re-recording after a
//! lapsed lease, sweeping dead nodes, and the readiness these imply.
//!
//! Every [`HubOptions::heartbeat_interval`](crate::HubOptions::heartbeat_interval) (a third of
//! the lease) the node
//!
//! 1. renews its lease. If the store answers that the lease had lapsed or was gone (the node
//!    could not reach the store for longer than the lease, so other nodes stopped seeing its
//!    connections and may have swept them), the node **records every live connection
//!    again**. It keeps its clients connected rather than closing them: closing would make
//!    every client reconnect at once, while re-recording restores the truth in one pass;
//! 2. retries removals that failed when a connection closed, until each succeeds, so a store
//!    outage never leaves a ghost user online on a live node;
//! 3. sweeps the records of nodes whose lease expired.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use futures_util::StreamExt as _;
use switchboard_core::{ConnectionId, Lease, Removal, StoreError, UserId};
use tokio::time::Instant;

use crate::delivery::Router;
use crate::throttle::Throttle;

/// Upserts in flight while live connections are recorded again after a lapsed lease.
const RERECORD_IN_FLIGHT: usize = 32;

/// Log lines about removals that failed again.
static RETRY_FAILED: Throttle = Throttle::new(1, Duration::from_secs(10));

/// The lease state and the removals waiting for a retry.
#[derive(Debug)]
pub(crate) struct Maintenance {
    lease: Duration,
    max_pending: usize,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// Connections that ended but could not be removed from the store yet, oldest first.
    removals: VecDeque<(UserId, ConnectionId)>,
    /// When renewing the lease began to fail (`None` while it works).
    failing_since: Option<Instant>,
    /// The last renewal error, for readiness.
    last_error: Option<String>,
    /// Whether the lapse was logged for this outage.
    lapse_logged: bool,
    /// Live connections must be recorded again (a re-record pass did not finish).
    rerecord: bool,
}

impl Maintenance {
    pub(crate) fn new(lease: Duration, max_pending: usize) -> Self {
        Self {
            lease,
            max_pending: max_pending.max(1),
            state: Mutex::new(State::default()),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // Plain bookkeeping: a panic elsewhere cannot leave it inconsistent.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a failed removal for retrying.
    pub(crate) fn retry_removal(&self, user: UserId, id: ConnectionId) {
        let mut state = self.state();
        if state.removals.len() >= self.max_pending
            && let Some((user, id)) = state.removals.pop_front()
        {
            tracing::error!(
                connection = %id,
                user = %user,
                max = self.max_pending,
                "too many removals wait for the store: giving up the oldest; its record stays \
                 until this node stops"
            );
        }
        state.removals.push_back((user, id));
    }

    /// Asks the next round to record every live connection again (a re-record failed).
    pub(crate) fn rerecord_later(&self) {
        self.state().rerecord = true;
    }

    /// Removals waiting for a retry.
    pub(crate) fn pending_removals(&self) -> usize {
        self.state().removals.len()
    }

    /// Why the store is not ready, if it is not: the last lease renewal failed.
    pub(crate) fn store_problem(&self) -> Option<String> {
        self.state().last_error.clone()
    }

    /// One round: renew, re-record if needed, retry removals, sweep.
    pub(crate) async fn tick(&self, router: &Router) {
        if router.capabilities.has_leases() {
            self.renew(router).await;
        }
        if std::mem::take(&mut self.state().rerecord) {
            self.rerecord(router).await;
        }
        self.retry_removals(router).await;
        if router.capabilities.has_leases() {
            match router.store.sweep().await {
                Ok(0) => {}
                Ok(count) => tracing::info!(count, "swept connections of expired nodes"),
                Err(e) => tracing::debug!(error = %e, "sweeping expired nodes failed"),
            }
        }
    }

    async fn renew(&self, router: &Router) {
        match router.store.heartbeat(&router.node, self.lease).await {
            Ok(lease) => {
                let mut state = self.state();
                if let Some(since) = state.failing_since.take() {
                    tracing::info!(
                        after = ?since.elapsed(),
                        "renewed this node's lease again"
                    );
                }
                state.last_error = None;
                state.lapse_logged = false;
                if lease != Lease::Renewed {
                    tracing::warn!(
                        ?lease,
                        "this node's lease had lapsed: recording its live connections again"
                    );
                    state.rerecord = true;
                }
            }
            Err(e) => self.renewal_failed(&e),
        }
    }

    /// Marks the lease as just taken (by start).
    pub(crate) fn taken(&self) {
        let mut state = self.state();
        state.failing_since = None;
        state.last_error = None;
    }

    fn renewal_failed(&self, error: &StoreError) {
        let mut state = self.state();
        let since = *state.failing_since.get_or_insert_with(Instant::now);
        state.last_error = Some(format!("could not renew this node's lease: {error}"));
        if since.elapsed() >= self.lease && !state.lapse_logged {
            state.lapse_logged = true;
            tracing::error!(
                error = %error,
                lease = ?self.lease,
                "this node could not renew its lease for longer than the lease: other nodes no \
                 longer see its connections and may sweep them; they are recorded again once \
                 the store answers"
            );
        } else if !state.lapse_logged {
            tracing::warn!(error = %error, "could not renew this node's lease; retrying");
        }
    }

    /// Records every live connection of this node again (an upsert each, up to
    /// [`RERECORD_IN_FLIGHT`] at a time). The pass stops at the first failure and the next
    /// round starts it again: during an outage every upsert would wait out the store's
    /// retry budget, and a pass over thousands of connections would hold up the lease
    /// renewals behind it.
    async fn rerecord(&self, router: &Router) {
        let records = router.registry.records(&router.node);
        let total = records.len();
        let mut upserts =
            futures_util::stream::iter(records.into_iter().map(|record| async move {
                let (user, id) = (record.user().clone(), record.id().clone());
                (router.store.reconnect(record).await, user, id)
            }))
            .buffer_unordered(RERECORD_IN_FLIGHT);
        let mut done = 0usize;
        while let Some((result, user, id)) = upserts.next().await {
            match result {
                Ok(()) => {
                    done += 1;
                    // The connection may have closed (and been removed) meanwhile: then the
                    // record just written is stale.
                    if !router.registry.contains(&id) {
                        self.retry_removal(user, id);
                    }
                }
                Err(e) => {
                    tracing::warn!(
                        error = %e,
                        recorded = done,
                        total,
                        "could not record every live connection again; retrying next round"
                    );
                    self.state().rerecord = true;
                    return;
                }
            }
        }
    }

    /// Retries the waiting removals, oldest first, until one fails.
    pub(crate) async fn retry_removals(&self, router: &Router) {
        loop {
            let Some((user, id)) = self.state().removals.pop_front() else {
                return;
            };
            match router.store.remove(&user, &id).await {
                Ok(Removal::Removed | Removal::NotFound) => {
                    tracing::debug!(connection = %id, "removed the connection from the store on retry");
                }
                Err(e) => {
                    let waiting = {
                        let mut state = self.state();
                        state.removals.push_front((user, id));
                        state.removals.len()
                    };
                    if let Some(suppressed) = RETRY_FAILED.allow() {
                        tracing::warn!(
                            error = %e,
                            waiting,
                            suppressed,
                            "removals from the store still fail; retrying"
                        );
                    }
                    return;
                }
            }
        }
    }
}
