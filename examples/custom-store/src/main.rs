//! Serves the chat hub on a store of your own: at most 3 connections per user.
//!
//! Run with:
//!
//! ```sh
//! cargo run -p example-custom-store
//! ```
//!
//! then open <http://127.0.0.1:5001> (the page needs `npm ci --prefix web` for the SignalR
//! browser client). A fourth tab of the same user is refused.

use std::sync::Arc;

use anyhow::Context;
use example_custom_store::LimitedStore;
use switchboard::app::{self, AppOptions};
use switchboard::auth::{Authenticator, JwtConfig};
use switchboard::{HubOptions, HubService, chat};
use switchboard_memory::MemoryStore;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt().init();
    // Development only: a fixed secret and the dev-token endpoint.
    let auth = Authenticator::new(JwtConfig::new("example-secret-example-secret-example!")?);
    let store = Arc::new(LimitedStore::new(Arc::new(MemoryStore::new()), 3));
    let hub = HubService::builder(chat::hub(), store, auth.clone())
        .options(HubOptions::default())
        .build();
    hub.start().await?;
    let router = app::router(
        &hub,
        &auth,
        &AppOptions {
            dev_tokens: true,
            vendor_dir: Some("web/node_modules/@microsoft/signalr/dist/browser".into()),
            admin: None,
        },
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:5001")
        .await
        .context("binding 127.0.0.1:5001")?;
    tracing::info!("open http://127.0.0.1:5001");
    app::serve(listener, router, vec![hub], async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await?;
    Ok(())
}
