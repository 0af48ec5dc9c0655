//! # switchboard
//!
//! A SignalR-compatible hub server that knows which authenticated user is behind which
//! real-time connection, and delivers a message "to user X" to every device and tab X has
//! open. The official SignalR clients connect to it unmodified (the JavaScript client is tested)
//! over WebSockets with the JSON hub protocol.
//!
//! It is a binary (`switchboard serve`) and a library: another axum application can serve a
//! [`HubService`] (a [`Hub`](hub::Hub) of its own over any
//! [`ConnectionStore`](switchboard_core::ConnectionStore)) under a path of its router.
//!
//! ```no_run
//! use std::sync::Arc;
//! use switchboard::{HubOptions, HubService, auth, chat};
//! use switchboard_memory::MemoryStore;
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let auth = auth::Authenticator::new(auth::JwtConfig::new(
//!     std::env::var("JWT_SECRET")?.into_bytes(),
//! )?);
//! let hub = HubService::builder(chat::hub(), Arc::new(MemoryStore::new()), auth)
//!     .options(HubOptions::default())
//!     .build();
//! // Takes the node's lease and starts its background work; connections are refused before.
//! hub.start().await?;
//! let app = axum::Router::new().nest(chat::PATH, hub.router());
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:5000").await?;
//! // Not `axum::serve`: it has no header-read timeout and no connection caps, so idle or
//! // half-sent connections would pile up until the process runs out of file descriptors.
//! let limits = switchboard::http::HttpLimits::default();
//! switchboard::http::serve(listener, app, limits, async move {
//!     let _ = tokio::signal::ctrl_c().await;
//!     hub.shutdown().await;
//! })
//! .await?;
//! # Ok(()) }
//! ```
//!
//! ## Modules
//!
//! | module | what |
//! |---|---|
//! | [`hub`] | the hub API: methods, context, client proxies, lifecycle hooks |
//! | [`service`] | [`HubService`]: the builder, `start` (lease, backplane, maintenance), readiness, shutdown |
//! | [`protocol`] | the SignalR JSON hub protocol |
//! | [`auth`] | JWT (HS256) bearer authentication |
//! | [`chat`] | the chat hub |
//! | [`app`] | the full application the `switchboard` binary serves |
//! | [`http`] | the HTTP server: timeouts and connection caps against slow or flooding clients |
//! | [`config`] | [`HubOptions`] |
//! | [`stores`] | the stores compiled into this build, by `--store` name |
//! //! | [`access`] | who may see operators' data: the admin claim |
//! | [`logs`] | text or JSON log lines, with the node id on every JSON line |
//! | [`operators`] | `switchboard users` and `switchboard connections`: the store read directly |

pub mod access;
pub mod app;
pub mod auth;
pub mod chat;
pub mod config;
mod deadline;
mod dedupe;
mod delivery;
pub mod http;
pub mod hub;
pub mod logs;
mod mailbox;
mod maintenance;
pub mod operators;
pub mod protocol;
mod registry;
pub mod service;
mod session;
mod state;
pub mod stores;
mod subscriptions;
mod throttle;
mod tokens;
mod transport;

pub use config::HubOptions;
pub use service::{HubService, HubServiceBuilder, Readiness, StartError};
