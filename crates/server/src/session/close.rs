//! Closing a connection, on every exit path: `on_disconnected`, leaving the registry and its
//! channels, and the removal from the store (retried in the background when it fails).

use std::panic::AssertUnwindSafe;

use futures_util::FutureExt;
use switchboard_core::Address;
use tracing::error;

use super::{ConnectionInfo, PANICKED, STORE_FAILED};
use crate::hub::HubContext;
use crate::state::Shared;

/// Releases the connection's token, runs `on_disconnected` if `on_connected` ran, takes the
/// connection out of the registry (and the channels it kept this node subscribed to) and
/// removes it from the store.
pub(super) async fn cleanup(inner: &Shared, info: &ConnectionInfo, connected: bool) {
    if let Some(token) = &info.token {
        inner.tokens.remove(token);
    }
    let router = &inner.router;
    if connected {
        let ctx = HubContext::new(router.clone(), info.user.clone(), info.id.clone());
        if let Some(hook) = inner.hub.disconnected_hook(ctx)
            && AssertUnwindSafe(hook).catch_unwind().await.is_err()
            && let Some(suppressed) = PANICKED.allow()
        {
            error!(connection = %info.id, user = %info.user, suppressed, "on_disconnected panicked");
        }
    }
    if let Some(groups) = router.registry.remove(&info.id)
        && let Some(backplane) = router.channels()
    {
        for group in groups {
            router
                .subscriptions
                .release(&**backplane, &Address::Group(group))
                .await;
        }
        if router.user_channels() {
            router
                .subscriptions
                .release(&**backplane, &Address::User(info.user.clone()))
                .await;
        }
    }
    if connected && let Err(e) = router.store.remove(&info.user, &info.id).await {
        if let Some(suppressed) = STORE_FAILED.allow() {
            error!(
                connection = %info.id,
                user = %info.user,
                error = %e,
                suppressed,
                "could not remove the connection from the store; retrying in the background"
            );
        }
        inner
            .maintenance
            .retry_removal(info.user.clone(), info.id.clone());
    }
}
