//! What the handlers, sessions and background tasks of one hub share.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use tokio::sync::{Notify, watch};

use crate::auth::Authenticator;
use crate::config::HubOptions;
use crate::delivery::Router;
use crate::hub::Hub;
use crate::maintenance::Maintenance;
use crate::tokens::Tokens;

/// Counts live sessions so shutdown can wait for their cleanup.
#[derive(Debug, Default)]
pub(crate) struct ActiveSessions {
    pub(crate) count: AtomicUsize,
    idle: Notify,
}

/// Decrements [`ActiveSessions`] when dropped.
pub(crate) struct ActiveGuard<'a>(&'a ActiveSessions);

impl ActiveSessions {
    pub(crate) fn enter(&self) -> ActiveGuard<'_> {
        self.count.fetch_add(1, Ordering::SeqCst);
        ActiveGuard(self)
    }

    pub(crate) async fn wait_idle(&self) {
        loop {
            let notified = self.idle.notified();
            if self.count.load(Ordering::SeqCst) == 0 {
                return;
            }
            notified.await;
        }
    }
}

impl Drop for ActiveGuard<'_> {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// Shared by the HTTP handlers, the sessions and the maintenance task of one hub.
#[derive(Debug)]
pub(crate) struct Shared {
    /// Routing: the store, this node's registry, the backplane.
    pub(crate) router: Arc<Router>,
    pub(crate) hub: Hub,
    pub(crate) options: HubOptions,
    pub(crate) auth: Authenticator,
    /// Negotiated connections waiting for their WebSocket (node-local).
    pub(crate) tokens: Tokens,
    /// Lease, removal retries and readiness.
    pub(crate) maintenance: Maintenance,
    /// Set once [`HubService::start`](crate::HubService::start) took the lease: connections are
    /// refused before.
    pub(crate) started: AtomicBool,
    pub(crate) shutdown: watch::Sender<bool>,
    pub(crate) active: ActiveSessions,
}

impl Shared {
    /// Whether shutdown has begun.
    pub(crate) fn shutting_down(&self) -> bool {
        *self.shutdown.borrow()
    }

    /// Whether the hub was started and serves connections.
    pub(crate) fn started(&self) -> bool {
        self.started.load(Ordering::Acquire)
    }

    /// The connection did not turn on stateful reconnect: later transports get 409.
    pub(crate) fn forbid_reattach(&self, token: &str) {
        self.tokens.forbid_reattach(token);
    }
}
