//! The complete Switchboard application: the chat hub, the chat page, health and development
//! tokens, served with graceful shutdown behind the limits of [`http`].

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;

use axum::Router;
use std::time::Duration;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::json;
use tokio::net::TcpListener;

use switchboard_core::UserId;

use crate::access::AdminAccess;
use crate::auth::Authenticator;
use crate::http::{self, HttpLimits};
use crate::service::HubService;
use crate::transport::error_response;

/// Options of the application around the hub.
#[derive(Debug, Clone, Default)]
pub struct AppOptions {
    /// Serve `POST /auth/dev-token`, which hands a token to anyone who asks. Development only.
    pub dev_tokens: bool,
    /// Directory holding the SignalR browser client (`signalr.min.js`), served under
    /// `/vendor/`. `None` disables `/vendor/`.
    pub vendor_dir: Option<PathBuf>,
    /// Who may see the operators' view (`/admin` and `/metrics`); `None` serves neither.
    pub admin: Option<AdminAccess>,
}

#[derive(Clone)]
struct PageState {
    chat: HubService,
    vendor_dir: Option<Arc<PathBuf>>,
}

/// The application's routes: the chat hub at [`chat::PATH`](crate::chat::PATH), the chat page
/// at `/`, `GET /healthz` (the process is up), `GET /readyz` (it can serve: started, lease
/// renewed, backplane up; 503 with the reasons otherwise), and with
/// [`AppOptions::dev_tokens`] `POST /auth/dev-token`.
pub fn router(chat: &HubService, auth: &Authenticator, options: &AppOptions) -> Router {
    let state = PageState {
        chat: chat.clone(),
        vendor_dir: options.vendor_dir.clone().map(Arc::new),
    };
    let mut router = Router::new()
        .route("/", get(page))
        .route("/chat.js", get(script))
        .route("/chat.css", get(style))
        .route("/vendor/{file}", get(vendor))
        .route("/healthz", get(health))
        .route("/readyz", get(ready))
        .with_state(state)
        .nest(crate::chat::PATH, chat.router());
    if options.dev_tokens {
        router = router.merge(
            Router::new()
                .route("/auth/dev-token", post(dev_token))
                .with_state(auth.clone()),
        );
    }
    router
}

/// Serves `router` on `listener` with the default [`HttpLimits`] until `shutdown` completes,
/// then closes every hub connection through [`HubService::shutdown`]. See
/// [`serve_with_limits`].
///
/// # Errors
///
/// I/O errors of the listener.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    hubs: Vec<HubService>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_with_limits(listener, router, hubs, HttpLimits::default(), shutdown).await
}

/// Serves `router` on `listener` through [`http::serve`] (with `TCP_NODELAY`, timeouts and
/// connection caps from `limits`) until `shutdown` completes, then closes every hub
/// connection through [`HubService::shutdown`] and lets the HTTP requests in progress
/// finish.
///
/// # Errors
///
/// I/O errors of the listener.
pub async fn serve_with_limits(
    listener: TcpListener,
    router: Router,
    hubs: Vec<HubService>,
    limits: HttpLimits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let signal = async move {
        shutdown.await;
        tracing::info!("shutting down: closing connections");
        // Upgraded WebSockets are not tracked by the HTTP server: the hubs close them.
        for hub in &hubs {
            hub.shutdown().await;
        }
    };
    http::serve(listener, router, limits, signal).await
}

async fn page() -> Html<&'static str> {
    Html(include_str!("../assets/index.html"))
}

async fn script() -> Response {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        include_str!("../assets/chat.js"),
    )
        .into_response()
}

async fn style() -> Response {
    (
        [(header::CONTENT_TYPE, "text/css; charset=utf-8")],
        include_str!("../assets/chat.css"),
    )
        .into_response()
}

/// The answer for a file under `/vendor/` that is not there.
const VENDOR_MISSING: &str = "not found (if this is the SignalR browser client, the server's \
     vendor directory lacks it: run `npm ci --prefix web` where the server runs)";

async fn vendor(State(state): State<PageState>, Path(file): Path<String>) -> Response {
    let Some(dir) = state.vendor_dir else {
        return (StatusCode::NOT_FOUND, "no vendor directory is configured").into_response();
    };
    let safe = !file.is_empty()
        && !file.starts_with('.')
        && file
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'));
    if !safe {
        return (StatusCode::NOT_FOUND, VENDOR_MISSING).into_response();
    }
    let content_type = if file.ends_with(".js") {
        "text/javascript; charset=utf-8"
    } else if file.ends_with(".map") {
        "application/json"
    } else {
        "application/octet-stream"
    };
    match tokio::fs::read(dir.join(&file)).await {
        Ok(bytes) => ([(header::CONTENT_TYPE, content_type)], bytes).into_response(),
        Err(e) => {
            // The answer names neither the file asked for nor where the server looked; the
            // log says where (at debug level: any client can ask for missing files).
            tracing::debug!(dir = %dir.display(), error = %e, "a vendor file was not found");
            (StatusCode::NOT_FOUND, VENDOR_MISSING).into_response()
        }
    }
}

async fn ready(State(state): State<PageState>) -> Response {
    let readiness = state.chat.readiness();
    let status = if readiness.is_ready() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let mut problems = Vec::new();
    if !readiness.started {
        problems.push("the hub has not started".to_owned());
    }
    if readiness.shutting_down {
        problems.push("the server is shutting down".to_owned());
    }
    problems.extend(readiness.store.iter().cloned());
    problems.extend(
        readiness
            .backplane
            .iter()
            .map(|b| format!("backplane: {b}")),
    );
    (
        status,
        axum::Json(json!({
            "status": if readiness.is_ready() { "ready" } else { "unavailable" },
            "node": state.chat.node().as_str(),
            "problems": problems,
        })),
    )
        .into_response()
}

async fn health(State(state): State<PageState>) -> Response {
    let caps = state.chat.store().capabilities();
    axum::Json(json!({
        "status": "ok",
        "store": caps.strategy,
        "node": state.chat.node().as_str(),
        "localConnections": state.chat.local_connections(),
    }))
    .into_response()
}

/// Issues development tokens; only routed when the server runs with `--dev`.
async fn dev_token(
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
