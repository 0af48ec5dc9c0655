//! An existing axum application that adds a real-time hub next to its own routes.
//!
//! Run with:
//!
//! ```sh
//! SWITCHBOARD_JWT_SECRET=$(head -c 32 /dev/urandom | base64) cargo run -p example-embed-hub
//! ```
//!
//! * `GET /api/hello` — an ordinary route of the application.
//! * `/hubs/notify` — a hub with one method, `Notify(who, text)`, which calls `notify(text)` on
//!   every connection of `who` and returns how many it reached.
//! * `POST /api/notify/{user}` with a text body — the application pushing to a user from an
//!   ordinary HTTP handler (for example after a payment went through).

use std::sync::Arc;

use anyhow::Context;
use axum::Router;
use axum::extract::{Path, State};
use axum::routing::{get, post};
use switchboard::auth::{Authenticator, JwtConfig};
use switchboard::hub::{Hub, HubContext, HubError};
use switchboard::{HubOptions, HubService};
use switchboard_core::UserId;
use switchboard_memory::MemoryStore;

fn notify_hub() -> Hub {
    Hub::new().method(
        "Notify",
        |ctx: HubContext, (who, text): (String, String)| async move {
            let who = UserId::new(&who).map_err(|e| HubError::client(e.to_string()))?;
            let reached = ctx.clients().user(&who).send("notify", &(text,)).await?;
            Ok::<_, HubError>(reached.reached())
        },
    )
}

/// `POST /api/notify/{user}`: pushes a notification from the application's own code. This
/// example leaves it unauthenticated to stay short: a real application puts it behind its own
/// authentication, or anyone could message any user.
async fn push(
    State(hub): State<HubService>,
    Path(user): Path<String>,
    text: String,
) -> Result<String, (axum::http::StatusCode, String)> {
    let bad_request = |e: String| (axum::http::StatusCode::BAD_REQUEST, e);
    let user = UserId::new(&user).map_err(|e| bad_request(e.to_string()))?;
    let reached = hub
        .user(&user)
        .send("notify", &(text,))
        .await
        .map_err(|e| (axum::http::StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
    Ok(format!("reached {} connection(s)\n", reached.reached()))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt().init();
    let secret = std::env::var("SWITCHBOARD_JWT_SECRET")
        .context("set SWITCHBOARD_JWT_SECRET to a secret of at least 32 bytes")?;
    let auth = Authenticator::new(JwtConfig::new(secret)?);
    let hub = HubService::builder(notify_hub(), Arc::new(MemoryStore::new()), auth)
        .options(HubOptions::default())
        .build();
    hub.start().await?;

    let app = Router::new()
        .route(
            "/api/hello",
            get(|| async { "hello from the application\n" }),
        )
        .route("/api/notify/{user}", post(push))
        .with_state(hub.clone())
        .nest("/hubs/notify", hub.router());

    let listener = tokio::net::TcpListener::bind("127.0.0.1:5002")
        .await
        .context("binding 127.0.0.1:5002")?;
    tracing::info!("listening on http://127.0.0.1:5002");
    // Served through switchboard's HTTP server rather than `axum::serve`, which has no
    // header-read timeout and no connection caps: idle and half-sent connections would
    // otherwise stay open until the process runs out of file descriptors. The default
    // `HttpLimits` apply; `app::serve_with_limits` takes others.
    switchboard::app::serve(listener, app, vec![hub], async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await?;
    Ok(())
}
