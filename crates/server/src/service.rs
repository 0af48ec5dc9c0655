//! [`HubService`]: one hub served over HTTP, built with [`HubService::builder`], started with
//! [`HubService::start`] and stopped with [`HubService::shutdown`].
//!
//! `start` does everything a node needs before it may serve: it sweeps expired nodes, takes
//! this node's lease (refusing to run under a node id another live node holds), starts the
//! backplane's incoming loop and the maintenance task. Until it returns, negotiate and
//! connect answer 503, so no connection is ever recorded under a node without a lease.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Router;
use axum::routing::{get, post};
use switchboard_core::{
    Address, Backplane, BackplaneError, ConnectionId, ConnectionStore, Lease, NodeId, StoreError,
    UserId,
};
use tokio::sync::{Mutex, watch};
use tokio::task::JoinHandle;

use crate::auth::Authenticator;
use crate::config::HubOptions;
use crate::deadline::WithDeadline;
use crate::delivery::{Router as MessageRouter, Target};
use crate::hub::{ClientProxy, Hub};
use crate::maintenance::Maintenance;
use crate::state::{ActiveSessions, Shared};
use crate::tokens::Tokens;
use crate::transport::{self, random_token};

/// One hub served over HTTP: `POST {path}/negotiate` and the WebSocket transport on `{path}`.
///
/// Cheap to clone. Build it with [`HubService::builder`], mount [`HubService::router`] under
/// the hub's path with [`Router::nest`], call [`HubService::start`] once inside the runtime,
/// and [`HubService::shutdown`] before the process exits.
#[derive(Debug, Clone)]
pub struct HubService {
    shared: Arc<Shared>,
    task: Arc<Mutex<Option<JoinHandle<()>>>>,
}

/// Builds a [`HubService`].
#[derive(Debug)]
#[must_use]
pub struct HubServiceBuilder {
    hub: Hub,
    store: Arc<dyn ConnectionStore>,
    auth: Authenticator,
    node: Option<NodeId>,
    backplane: Option<Arc<dyn Backplane>>,
    options: HubOptions,
}

impl HubServiceBuilder {
    /// The node id to run as, exactly. Without it (the usual case) the node gets a fresh id
    /// `node-<random>` every time the process starts; see [`fresh_node_id`].
    pub fn node(mut self, node: NodeId) -> Self {
        self.node = Some(node);
        self
    }

    /// The backplane that carries messages to other nodes. Without one, sends reach this
    /// node's connections only, and connections recorded by other nodes are reported
    /// unreachable.
    pub fn backplane(mut self, backplane: Arc<dyn Backplane>) -> Self {
        self.backplane = Some(backplane);
        self
    }

    /// The hub's options (default: [`HubOptions::default`]).
    pub fn options(mut self, options: HubOptions) -> Self {
        self.options = options;
        self
    }

    /// The service, not started yet. Every store call gets [`HubOptions::store_timeout`] as
    /// its deadline.
    pub fn build(self) -> HubService {
        let Self {
            hub,
            store,
            auth,
            node,
            backplane,
            options,
        } = self;
        let node = node.unwrap_or_else(|| {
            fresh_node_id(DEFAULT_NODE_PREFIX).expect("the default prefix makes a valid node id")
        });
        let (shutdown, _) = watch::channel(false);
        let store: Arc<dyn ConnectionStore> =
            Arc::new(WithDeadline::new(store, options.store_timeout));
        HubService {
            shared: Arc::new(Shared {
                router: Arc::new(MessageRouter::new(
                    store,
                    node,
                    backplane,
                    options.send_timeout,
                )),
                hub,
                maintenance: Maintenance::new(options.lease, options.max_pending_removals),
                options,
                auth,
                tokens: Tokens::default(),
                started: Default::default(),
                shutdown,
                active: ActiveSessions::default(),
            }),
            task: Arc::new(Mutex::new(None)),
        }
    }
}

/// Why [`HubService::start`] failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// The store could not sweep or grant this node's lease.
    #[error("taking this node's lease in the store failed: {0}")]
    Store(#[from] StoreError),
    /// The backplane could not start receiving for this node.
    #[error("starting the backplane failed: {0}")]
    Backplane(#[from] BackplaneError),
    /// Another live node holds a lease under this node id.
    #[error(
        "node id `{0}` is in use by another live node: give every node its own id (or let \
         Switchboard pick a fresh one)"
    )]
    NodeInUse(NodeId),
    /// `start` was called before.
    #[error("the hub service was started already")]
    AlreadyStarted,
    /// A backplane was given with a store whose records stay on their node and that does not
    /// span nodes either (the in-memory map): other nodes' users could never be found.
    #[error(
        "the `{0}` store keeps each server's connections to itself, so a backplane cannot make \
         several servers serve users together: use a store that spans servers"
    )]
    NodeLocalStore(&'static str),
}

/// Whether a node is ready to serve, and if not, why.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Readiness {
    /// [`HubService::start`] finished.
    pub started: bool,
    /// Shutdown began.
    pub shutting_down: bool,
    /// Why the store is not usable (the last lease renewal failed), if it is not.
    pub store: Option<String>,
    /// Why the backplane is not usable, if one is configured and it is not.
    pub backplane: Option<String>,
}

impl Readiness {
    /// Whether the node serves and its store and backplane work.
    pub fn is_ready(&self) -> bool {
        self.started && !self.shutting_down && self.store.is_none() && self.backplane.is_none()
    }
}

/// The prefix of node ids when none is configured.
pub const DEFAULT_NODE_PREFIX: &str = "node";

/// A fresh node id: `prefix`, a dash and 8 random URL-safe characters. A new one every time a
/// process starts, so a restarted node never adopts its predecessor's records.
///
/// # Errors
///
/// When the prefix makes an invalid node id (characters outside `A-Z a-z 0-9 - . _ ~`, or
/// longer than [`NodeId::MAX_LEN`] minus 9).
pub fn fresh_node_id(prefix: &str) -> Result<NodeId, switchboard_core::InvalidId> {
    NodeId::new(&format!("{prefix}-{}", random_token(6)))
}

impl HubService {
    /// Starts building a hub service for `hub`, recording connections in `store` and
    /// authenticating with `auth`.
    pub fn builder(
        hub: Hub,
        store: Arc<dyn ConnectionStore>,
        auth: Authenticator,
    ) -> HubServiceBuilder {
        HubServiceBuilder {
            hub,
            store,
            auth,
            node: None,
            backplane: None,
            options: HubOptions::default(),
        }
    }

    /// Routes to nest under the hub's path: `POST /negotiate` and `GET /` (WebSocket).
    pub fn router(&self) -> Router {
        Router::new()
            .route("/", get(transport::connect))
            .route("/negotiate", post(transport::negotiate))
            .with_state(self.shared.clone())
    }

    /// Takes this node's lease (for stores with leases, after sweeping expired nodes), starts
    /// the backplane's incoming loop, and starts the maintenance task (lease renewal, removal
    /// retries, sweeps) until [`shutdown`](Self::shutdown). Connections are refused until it
    /// returns `Ok`.
    ///
    /// # Errors
    ///
    /// [`StartError`]: the store or the backplane failed, another live node uses this node
    /// id, or the service was started already.
    pub async fn start(&self) -> Result<(), StartError> {
        let mut task = self.task.lock().await;
        if task.is_some() || self.shared.started() {
            return Err(StartError::AlreadyStarted);
        }
        let router = &self.shared.router;
        if router.backplane.is_some() && !router.capabilities.spans_nodes() {
            return Err(StartError::NodeLocalStore(router.capabilities.strategy));
        }
        if router.capabilities.has_leases() {
            // Sweep first: a crashed predecessor's expired lease must not pass for ours.
            let _ = router.store.sweep().await?;
            if router
                .store
                .heartbeat(&router.node, self.shared.options.lease)
                .await?
                == Lease::Renewed
            {
                return Err(StartError::NodeInUse(router.node.clone()));
            }
            self.shared.maintenance.taken();
        }
        if let Some(backplane) = &router.backplane {
            backplane.start(&router.node, router.inbox()).await?;
            if backplane.capabilities().channels {
                backplane.subscribe(&Address::All).await?;
            } else {
                tracing::warn!(
                    backplane = backplane.capabilities().name,
                    "the backplane carries no channels: groups and broadcasts reach this node's \
                     connections only, and so do users under a store without lookup"
                );
            }
        } else if router.capabilities.shared_across_nodes {
            tracing::warn!(
                store = router.capabilities.strategy,
                "the store is shared across nodes but no backplane is configured: messages to \
                 connections on other nodes are reported unreachable"
            );
        }
        let shared = self.shared.clone();
        let mut shutdown = self.shared.shutdown.subscribe();
        *task = Some(tokio::spawn(async move {
            let mut tick = tokio::time::interval(shared.options.heartbeat_interval());
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tokio::select! {
                    _ = shutdown.changed() => return,
                    _ = tick.tick() => {}
                }
                shared.maintenance.tick(&shared.router).await;
            }
        }));
        self.shared.started.store(true, Ordering::Release);
        tracing::debug!(node = %router.node, "hub service started");
        Ok(())
    }

    /// The store connections are recorded in (behind the store-call deadline).
    pub fn store(&self) -> &Arc<dyn ConnectionStore> {
        &self.shared.router.store
    }

    /// This node's id.
    pub fn node(&self) -> &NodeId {
        &self.shared.router.node
    }

    /// Every live connection of `user`, on every node, for sending from outside a hub method
    /// (an HTTP handler, a background job).
    pub fn user(&self, user: &UserId) -> ClientProxy<'_> {
        ClientProxy::new(&self.shared.router, Target::User(user.clone()))
    }

    /// One connection, by its public id, on whichever node holds it.
    pub fn client(&self, id: &ConnectionId) -> ClientProxy<'_> {
        ClientProxy::new(&self.shared.router, Target::Connection(id.clone()))
    }

    /// Every member of a group, on every node (this node only without a backplane).
    pub fn group(&self, group: &str) -> ClientProxy<'_> {
        ClientProxy::new(&self.shared.router, Target::Group(Arc::from(group)))
    }

    /// Every connection of this hub, on every node (this node only without a backplane).
    pub fn all(&self) -> ClientProxy<'_> {
        ClientProxy::new(&self.shared.router, Target::All)
    }

    /// Connections this node currently holds.
    pub fn local_connections(&self) -> usize {
        self.shared.router.registry.len()
    }

    /// Removals from the store that failed and wait for a retry.
    pub fn pending_removals(&self) -> usize {
        self.shared.maintenance.pending_removals()
    }

    /// Whether this node is ready to serve: started, not shutting down, its lease renewed at
    /// the last attempt, its backplane up.
    pub fn readiness(&self) -> Readiness {
        let backplane = self
            .shared
            .router
            .backplane
            .as_ref()
            .and_then(|b| match b.health() {
                switchboard_core::Health::Up => None,
                switchboard_core::Health::Down(why) => Some(why),
            });
        Readiness {
            started: self.shared.started(),
            shutting_down: self.shared.shutting_down(),
            store: self.shared.maintenance.store_problem(),
            backplane,
        }
    }

    /// Closes every connection with a Close message (allowing clients to reconnect elsewhere),
    /// waits up to [`HubOptions::shutdown_grace`] for their cleanup (removal from the store),
    /// refuses new connections from then on, retries removals that failed, releases this
    /// node's lease (removing any record it still has) and stops the backplane.
    pub async fn shutdown(&self) {
        self.shared.shutdown.send_replace(true);
        let grace = self.shared.options.shutdown_grace;
        if tokio::time::timeout(grace, self.shared.active.wait_idle())
            .await
            .is_err()
        {
            tracing::warn!(
                remaining = self.shared.active.count.load(Ordering::SeqCst),
                "connections still open after the shutdown grace period"
            );
        }
        if let Some(task) = self.task.lock().await.take() {
            let _ = task.await;
        }
        let router = &self.shared.router;
        self.shared.maintenance.retry_removals(router).await;
        if self.shared.started() && router.capabilities.has_leases() {
            match router.store.release(&router.node).await {
                Ok(0) => {}
                Ok(count) => {
                    tracing::info!(
                        count,
                        "removed this node's remaining connections from the store"
                    );
                }
                Err(e) => tracing::warn!(
                    error = %e,
                    "could not release this node's lease; its records go when the lease expires"
                ),
            }
        }
        if let Some(backplane) = &router.backplane {
            backplane.stop().await;
        }
    }
}
