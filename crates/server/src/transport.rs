//! The HTTP face of a hub: `POST /negotiate`, the WebSocket upgrade (with the connection token
//! or `skipNegotiation`), and the checks before a session starts.
//!
//! Negotiate tokens and the stateful-reconnect buffer live on the node that issued them: a
//! load balancer in front of several nodes must send a client's negotiate, its WebSocket and
//! any re-attach to the same node (sticky sessions), as with ASP.NET Core SignalR.

use std::sync::Arc;

use axum::Json;
use axum::extract::ws::{WebSocketUpgrade, rejection::WebSocketUpgradeRejection};
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rand::Rng as _;
use serde_json::json;
use switchboard_core::{ConnectionId, ConnectionRecord, NodeId, UserId};
use tokio::time::Instant;

use crate::auth;
use crate::config::HubOptions;
use crate::delivery;
use crate::session::{self, ConnectionInfo, too_many_connections};
use crate::state::Shared;
use crate::tokens::{ClaimError, Claimed, PendingRefusal, PendingToken};

/// A random URL-safe string of `bytes` random bytes.
pub(crate) fn random_token(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    rand::rng().fill_bytes(&mut buf);
    URL_SAFE_NO_PAD.encode(&buf)
}

/// A fresh connection id on `node`: the node's id and 16 random bytes (22 base64url
/// characters).
fn new_connection_id(node: &NodeId) -> ConnectionId {
    delivery::connection_id(node, &random_token(16))
}

fn query_param<'a>(query: Option<&'a str>, name: &str) -> Option<&'a str> {
    query?
        .split('&')
        .filter_map(|pair| pair.split_once('=').or(Some((pair, ""))))
        .find(|(key, _)| *key == name)
        .map(|(_, value)| value)
}

pub(crate) fn error_response(status: StatusCode, message: &str) -> Response {
    (status, Json(json!({ "error": message }))).into_response()
}

/// Admits a request to the hub: `Err` is the 503 to send while shutting down, or the 401 for
/// a missing or invalid access token.
fn admit(
    inner: &Shared,
    headers: &HeaderMap,
    query: Option<&str>,
) -> Result<UserId, Box<Response>> {
    if inner.shutting_down() {
        return Err(Box::new(error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "the server is shutting down",
        )));
    }
    if !inner.started() {
        return Err(Box::new(error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "the server is starting; try again shortly",
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
fn check_user_connections(inner: &Shared, user: &UserId) -> Result<(), Box<Response>> {
    let limit = inner.options.max_connections_per_user.max(1);
    let held = inner.router.registry.user_connections(user) + inner.tokens.pending_for(user);
    if held >= limit {
        return Err(Box::new(error_response(
            StatusCode::TOO_MANY_REQUESTS,
            &too_many_connections(limit),
        )));
    }
    Ok(())
}

pub(crate) async fn negotiate(
    State(inner): State<Arc<Shared>>,
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
    let id = new_connection_id(&inner.router.node);
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

pub(crate) async fn connect(
    State(inner): State<Arc<Shared>>,
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
                    id: new_connection_id(&inner.router.node),
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
        let node = NodeId::new("web-1").expect("valid");
        let a = new_connection_id(&node);
        let b = new_connection_id(&node);
        assert_ne!(a, b);
        assert_eq!(a.as_str().len(), "web-1~".len() + 22);
        assert_eq!(delivery::node_of(&a), Some(node));
        assert_eq!(random_token(32).len(), 43);
    }
}
