//! [`HubService`]: one hub served over HTTP — negotiate, the WebSocket transport, lifecycle
//! wiring to the store, node leases, and graceful shutdown.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::extract::ws::{WebSocketUpgrade, rejection::WebSocketUpgradeRejection};
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rand::Rng as _;
use serde_json::json;
use switchboard_core::{ConnectionId, ConnectionRecord, ConnectionStore, NodeId, UserId};
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::auth::{self, Authenticator};
use crate::config::HubOptions;
use crate::deadline::WithDeadline;
use crate::delivery::Core;
use crate::hub::{ClientProxy, Hub, Target};
use crate::session::{self, ConnectionInfo, too_many_connections};
use crate::tokens::{ClaimError, Claimed, PendingRefusal, PendingToken, Tokens};

/// Counts live sessions so shutdown can wait for their cleanup.
#[derive(Debug, Default)]
pub(crate) struct ActiveSessions {
    count: AtomicUsize,
    idle: Notify,
}

/// Decrements [`ActiveSessions`] when dropped.
pub(crate) struct ActiveGuard<'a>(&'a ActiveSessions);

impl ActiveSessions {
    pub(crate) fn enter(&self) -> ActiveGuard<'_> {
        self.count.fetch_add(1, Ordering::SeqCst);
        ActiveGuard(self)
    }

    async fn wait_idle(&self) {
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

/// Shared by the handlers and sessions of one hub.
#[derive(Debug)]
pub(crate) struct Inner {
    pub(crate) core: Arc<Core>,
    pub(crate) hub: Hub,
    pub(crate) options: HubOptions,
    pub(crate) auth: Authenticator,
    pub(crate) tokens: Tokens,
    pub(crate) shutdown: watch::Sender<bool>,
    pub(crate) active: ActiveSessions,
}

impl Inner {
    /// Whether shutdown has begun.
    pub(crate) fn shutting_down(&self) -> bool {
        *self.shutdown.borrow()
    }

    /// The connection did not turn on stateful reconnect: later transports get 409.
    pub(crate) fn forbid_reattach(&self, token: &str) {
        self.tokens.forbid_reattach(token);
    }
}

/// One hub served over HTTP: `POST {path}/negotiate` and the WebSocket transport on `{path}`.
///
/// Cheap to clone. Mount [`HubService::router`] under the hub's path with
/// [`Router::nest`]; call [`HubService::start_maintenance`] once inside the runtime, and
/// [`HubService::shutdown`] before the process exits.
#[derive(Debug, Clone)]
pub struct HubService {
    inner: Arc<Inner>,
}

impl HubService {
    /// A hub service recording connections in `store` as node `node`, authenticating with
    /// `auth`. Every store call gets [`HubOptions::store_timeout`] as its deadline.
    pub fn new(
        hub: Hub,
        store: Arc<dyn ConnectionStore>,
        node: NodeId,
        auth: Authenticator,
        options: HubOptions,
    ) -> Self {
        let (shutdown, _) = watch::channel(false);
        let store: Arc<dyn ConnectionStore> =
            Arc::new(WithDeadline::new(store, options.store_timeout));
        Self {
            inner: Arc::new(Inner {
                core: Arc::new(Core::new(store, node, options.send_timeout)),
                hub,
                options,
                auth,
                tokens: Tokens::default(),
                shutdown,
                active: ActiveSessions::default(),
            }),
        }
    }

    /// Routes to nest under the hub's path: `POST /negotiate` and `GET /` (WebSocket).
    pub fn router(&self) -> Router {
        Router::new()
            .route("/", get(connect))
            .route("/negotiate", post(negotiate))
            .with_state(self.inner.clone())
    }

    /// The store connections are recorded in (behind the store-call deadline).
    pub fn store(&self) -> &Arc<dyn ConnectionStore> {
        &self.inner.core.store
    }

    /// This node's id.
    pub fn node(&self) -> &NodeId {
        &self.inner.core.node
    }

    /// Every live connection of `user`, for sending from outside a hub method (an HTTP
    /// handler, a background job).
    pub fn user(&self, user: &UserId) -> ClientProxy<'_> {
        ClientProxy::new(&self.inner.core, Target::User(user.clone()))
    }

    /// One connection, by its public id, for sending from outside a hub method.
    pub fn client(&self, id: &ConnectionId) -> ClientProxy<'_> {
        ClientProxy::new(&self.inner.core, Target::Connection(id.clone()))
    }

    /// Every member of a group, for sending from outside a hub method.
    pub fn group(&self, group: &str) -> ClientProxy<'_> {
        ClientProxy::new(&self.inner.core, Target::Group(group.to_owned()))
    }

    /// Every connection of this hub on this node, for sending from outside a hub method.
    pub fn all(&self) -> ClientProxy<'_> {
        ClientProxy::new(&self.inner.core, Target::All)
    }

    /// Connections this node currently holds.
    pub fn local_connections(&self) -> usize {
        self.inner.core.registry.len()
    }

    /// For stores with node leases: takes the lease now, then renews it and sweeps expired
    /// nodes every [`HubOptions::heartbeat_interval`] until shutdown. Returns `None` for stores
    /// without leases.
    ///
    /// # Errors
    ///
    /// The store's error if the first heartbeat fails (the node must not serve connections
    /// without a lease, or other nodes would sweep them).
    pub async fn start_maintenance(
        &self,
    ) -> Result<Option<JoinHandle<()>>, switchboard_core::StoreError> {
        let core = self.inner.core.clone();
        if !core.capabilities.has_leases() {
            return Ok(None);
        }
        let lease = self.inner.options.lease;
        let every = self.inner.options.heartbeat_interval;
        let _ = core.store.heartbeat(&core.node, lease).await?;
        let mut shutdown = self.inner.shutdown.subscribe();
        Ok(Some(tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = shutdown.changed() => return,
                    _ = tick.tick() => {}
                }
                if let Err(e) = core.store.heartbeat(&core.node, lease).await {
                    tracing::error!(error = %e, "could not renew this node's lease");
                }
                match core.store.sweep().await {
                    Ok(swept) if swept > 0 => {
                        tracing::info!(count = swept, "swept connections of expired nodes");
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "sweeping expired nodes failed"),
                }
            }
        })))
    }

    /// Closes every connection with a Close message (allowing clients to reconnect elsewhere),
    /// waits up to [`HubOptions::shutdown_grace`] for their cleanup (removal from the store),
    /// and refuses new connections from then on.
    pub async fn shutdown(&self) {
        self.inner.shutdown.send_replace(true);
        let grace = self.inner.options.shutdown_grace;
        if tokio::time::timeout(grace, self.inner.active.wait_idle())
            .await
            .is_err()
        {
            tracing::warn!(
                remaining = self.inner.active.count.load(Ordering::SeqCst),
                "connections still open after the shutdown grace period"
            );
        }
    }
}

/// A fresh random node id (`node-` and 8 random URL-safe characters).
pub fn random_node_id() -> NodeId {
    NodeId::new(&format!("node-{}", random_token(6))).expect("base64url output is a valid node id")
}

/// A random URL-safe string of `bytes` random bytes.
pub(crate) fn random_token(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    rand::rng().fill_bytes(&mut buf);
    URL_SAFE_NO_PAD.encode(&buf)
}

fn new_connection_id() -> ConnectionId {
    // 16 random bytes → 22 base64url characters, all in ConnectionId's alphabet.
    ConnectionId::new(&random_token(16)).expect("base64url output is a valid connection id")
}

fn query_param<'a>(query: Option<&'a str>, name: &str) -> Option<&'a str> {
    query?
        .split('&')
        .filter_map(|pair| pair.split_once('=').or(Some((pair, ""))))
        .find(|(key, _)| *key == name)
        .map(|(_, value)| value)
}

fn error_response(status: StatusCode, message: &str) -> Response {
    (status, Json(json!({ "error": message }))).into_response()
}

/// Admits a request to the hub: `Err` is the 503 to send while shutting down, or the 401 for
/// a missing or invalid access token.
fn admit(inner: &Inner, headers: &HeaderMap, query: Option<&str>) -> Result<UserId, Box<Response>> {
    if inner.shutting_down() {
        return Err(Box::new(error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "the server is shutting down",
        )));
    }
    let Some(token) = auth::bearer_token(headers, query) else {
        return Err(Box::new(unauthorized("an access token is required")));
    };
    inner.auth.verify(&token).map_err(|e| {
        tracing::debug!(reason = %e.client_message(), "rejected an access token");
        Box::new(unauthorized(&e.client_message()))
    })
}

fn unauthorized(message: &str) -> Response {
    let mut response = error_response(StatusCode::UNAUTHORIZED, message);
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        header::HeaderValue::from_static("Bearer"),
    );
    response
}

/// The client's user agent, cut at the edge to what a record keeps: an oversized header never
/// stays in memory past the request.
fn user_agent(headers: &HeaderMap) -> Option<Arc<str>> {
    let raw = headers
        .get("x-signalr-user-agent")
        .or_else(|| headers.get(header::USER_AGENT))
        .and_then(|v| v.to_str().ok())?;
    let cut = ConnectionRecord::cut_user_agent(raw.trim());
    (!cut.is_empty()).then(|| Arc::from(cut))
}

/// Refuses a request of a user who already holds (or is opening) as many connections as
/// allowed.
fn check_user_connections(inner: &Inner, user: &UserId) -> Result<(), Box<Response>> {
    let limit = inner.options.max_connections_per_user.max(1);
    let held = inner.core.registry.user_connections(user) + inner.tokens.pending_for(user);
    if held >= limit {
        return Err(Box::new(error_response(
            StatusCode::TOO_MANY_REQUESTS,
            &too_many_connections(limit),
        )));
    }
    Ok(())
}

async fn negotiate(
    State(inner): State<Arc<Inner>>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Response {
    let user = match admit(&inner, &headers, query.as_deref()) {
        Ok(user) => user,
        Err(response) => return *response,
    };
    let version = match query_param(query.as_deref(), "negotiateVersion") {
        None => 0,
        Some(v) => match v.parse::<i64>() {
            Ok(v) if v >= 1 => 1,
            Ok(_) => 0,
            Err(_) => {
                return error_response(
                    StatusCode::BAD_REQUEST,
                    "negotiateVersion must be an integer",
                );
            }
        },
    };
    if let Err(response) = check_user_connections(&inner, &user) {
        return *response;
    }
    let stateful = inner.options.stateful_reconnect
        && version >= 1
        && query_param(query.as_deref(), "useStatefulReconnect") == Some("true");
    let id = new_connection_id();
    // Version 0 clients put the connection id itself into `id=`.
    let token: Arc<str> = if version == 0 {
        Arc::from(id.as_str())
    } else {
        Arc::from(random_token(32))
    };
    let now = Instant::now();
    let pending = PendingToken {
        id: id.clone(),
        user,
        user_agent: user_agent(&headers),
        stateful,
    };
    if let Err(refusal) = inner.tokens.add_pending(
        token.clone(),
        pending,
        now + inner.options.negotiate_ttl,
        now,
        inner.options.max_pending_negotiations,
        inner.options.max_pending_negotiations_per_user,
    ) {
        return match refusal {
            PendingRefusal::Total(_) => error_response(
                StatusCode::SERVICE_UNAVAILABLE,
                "too many connections are being negotiated; try again later",
            ),
            PendingRefusal::User(limit) => error_response(
                StatusCode::TOO_MANY_REQUESTS,
                &format!(
                    "too many connections of this user are being negotiated (at most {limit} at once); \
                     connect the ones already negotiated or wait for them to expire"
                ),
            ),
        };
    }
    let transports = json!([{ "transport": "WebSockets", "transferFormats": ["Text", "Binary"] }]);
    let mut body = if version == 0 {
        json!({ "negotiateVersion": 0, "connectionId": id.as_str(), "availableTransports": transports })
    } else {
        json!({
            "negotiateVersion": 1,
            "connectionId": id.as_str(),
            "connectionToken": &*token,
            "availableTransports": transports,
        })
    };
    if stateful {
        body["useStatefulReconnect"] = serde_json::Value::Bool(true);
    }
    Json(body).into_response()
}

async fn connect(
    State(inner): State<Arc<Inner>>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let user = match admit(&inner, &headers, query.as_deref()) {
        Ok(user) => user,
        Err(response) => return *response,
    };
    let upgrade = match upgrade {
        Ok(upgrade) => upgrade,
        Err(rejection) => return rejection.into_response(),
    };
    let (info, reattach) = match query_param(query.as_deref(), "id") {
        // skipNegotiation: the connection starts with the upgrade.
        None => {
            if let Err(response) = check_user_connections(&inner, &user) {
                return *response;
            }
            (
                ConnectionInfo {
                    id: new_connection_id(),
                    token: None,
                    user,
                    user_agent: user_agent(&headers),
                },
                None,
            )
        }
        Some(token) => match inner.tokens.claim(token, &user, Instant::now()) {
            Ok((
                token,
                Claimed::New {
                    id,
                    user_agent,
                    reattach,
                },
            )) => (
                ConnectionInfo {
                    id,
                    token: Some(token),
                    user,
                    user_agent,
                },
                reattach,
            ),
            Ok((_, Claimed::Reattach(sender))) => {
                return configure(upgrade, &inner.options).on_upgrade(move |socket| async move {
                    if sender.send(socket).await.is_err() {
                        tracing::debug!("the connection ended before its client re-attached");
                    }
                });
            }
            Err(ClaimError::NotFound) => {
                return error_response(StatusCode::NOT_FOUND, "no such connection");
            }
            Err(ClaimError::OtherUser) => {
                return error_response(
                    StatusCode::FORBIDDEN,
                    "this connection belongs to another user",
                );
            }
            Err(ClaimError::Attached) => {
                return error_response(
                    StatusCode::CONFLICT,
                    "a transport is already attached to this connection",
                );
            }
        },
    };
    let failed_token = info.token.clone();
    let failed_inner = inner.clone();
    configure(upgrade, &inner.options)
        .on_failed_upgrade(move |e| {
            tracing::debug!(error = %e, "WebSocket upgrade failed");
            if let Some(token) = failed_token {
                failed_inner.tokens.remove(&token);
            }
        })
        .on_upgrade(move |socket| session::run(inner, socket, info, reattach))
}

/// Buffer sizes and limits of a hub WebSocket.
fn configure(upgrade: WebSocketUpgrade, options: &HubOptions) -> WebSocketUpgrade {
    upgrade
        .read_buffer_size(options.read_buffer_size)
        .write_buffer_size(options.write_buffer_size)
        // Must exceed the write buffer target, or the WebSocket refuses the configuration.
        .max_write_buffer_size(
            options.max_record_size.saturating_mul(64).max(1 << 20).max(
                options
                    .write_buffer_size
                    .saturating_add(options.max_record_size)
                    + 1,
            ),
        )
        .max_message_size(options.max_record_size.saturating_mul(4))
        .max_frame_size(options.max_record_size.saturating_mul(4))
}

/// Issues development tokens; only routed when the server runs with `--dev`.
pub(crate) async fn dev_token(
    State(auth): State<Authenticator>,
    Json(body): Json<serde_json::Value>,
) -> Response {
    let Some(raw) = body.get("user").and_then(|u| u.as_str()) else {
        return error_response(
            StatusCode::BAD_REQUEST,
            "expected a JSON body like {\"user\":\"alice\"}",
        );
    };
    match UserId::new(raw) {
        Ok(user) => {
            let token = auth.issue(&user, Duration::from_secs(12 * 3600));
            Json(json!({ "token": token, "user": user.as_str() })).into_response()
        }
        Err(e) => error_response(StatusCode::BAD_REQUEST, &e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_params() {
        assert_eq!(query_param(Some("id=abc&x=1"), "id"), Some("abc"));
        assert_eq!(query_param(Some("x=1&id="), "id"), Some(""));
        assert_eq!(query_param(Some("idx=1"), "id"), None);
        assert_eq!(query_param(None, "id"), None);
    }

    #[test]
    fn an_oversized_user_agent_is_cut_where_it_is_read() {
        let mut headers = HeaderMap::new();
        let huge = format!("Mozilla/5.0 {}", "x".repeat(380 * 1024));
        headers.insert(
            "x-signalr-user-agent",
            header::HeaderValue::from_str(&huge).expect("a valid header value"),
        );
        let kept = user_agent(&headers).expect("a user agent");
        assert!(
            kept.len() <= ConnectionRecord::MAX_USER_AGENT,
            "{}",
            kept.len()
        );
        assert!(kept.starts_with("Mozilla/5.0 x"));
        headers.insert(
            "x-signalr-user-agent",
            header::HeaderValue::from_static("  "),
        );
        assert_eq!(user_agent(&headers), None, "a blank user agent is none");
    }

    #[test]
    fn generated_ids_are_valid_and_distinct() {
        let a = new_connection_id();
        let b = new_connection_id();
        assert_ne!(a, b);
        assert_eq!(a.as_str().len(), 22);
        assert_eq!(random_token(32).len(), 43);
    }
}
