//! The hub API: methods clients can call, the context they run in, and proxies to call clients.
//!
//! A [`Hub`] is a table of methods dispatched by name (case-insensitively, like ASP.NET Core)
//! with typed arguments decoded by serde, plus optional lifecycle hooks. No type parameter
//! leaks into handlers: every handler gets a [`HubContext`] and its own argument tuple.
//!
//! ```
//! use switchboard::hub::{Hub, HubContext, HubError};
//!
//! let hub = Hub::new().method("Shout", |ctx: HubContext, (text,): (String,)| async move {
//!     ctx.clients().caller().send("heard", &(text.to_uppercase(),)).await?;
//!     Ok::<_, HubError>(())
//! });
//! assert!(hub.has_method("shout"));
//! ```
//!
//! The framework records every connection in the configured
//! [`ConnectionStore`](switchboard_core::ConnectionStore) before `on_connected` runs, removes it
//! after `on_disconnected` (which runs on every exit path: client close, socket error, timeout,
//! server shutdown, a panic in a hub method), and records re-attached connections before
//! `on_reconnected`.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::value::RawValue;
use switchboard_core::{Address, BackplaneError, ConnectionId, StoreError, UserId};

pub use crate::delivery::{Delivery, Forwarded};
use crate::delivery::{DeliveryError, Router, Target};
use crate::registry::Joined;

/// A boxed, sendable future.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

type MethodFn = dyn Fn(HubContext, &RawValue) -> Result<BoxFuture<Result<Box<RawValue>, HubError>>, HubError>
    + Send
    + Sync;
type HookFn = dyn Fn(HubContext) -> BoxFuture<()> + Send + Sync;

/// Why a hub method failed. The caller's Completion carries [`HubError::client_message`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HubError {
    /// An error meant for the caller: its text is sent as is (like ASP.NET's `HubException`).
    #[error("{0}")]
    Client(String),
    /// The arguments did not match the method's parameters.
    #[error("invalid arguments: {0}")]
    InvalidArguments(String),
    /// The connection store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The backplane between nodes failed (joining a group that spans nodes).
    #[error(transparent)]
    Backplane(#[from] BackplaneError),
    /// A value could not be serialized.
    #[error("serialization failed: {0}")]
    Serialize(#[from] serde_json::Error),
}

impl HubError {
    /// An error whose text the caller sees.
    pub fn client(message: impl Into<String>) -> Self {
        Self::Client(message.into())
    }

    /// The text sent to the caller in the error Completion of method `method`. Internal details
    /// are not revealed except for [`HubError::Client`] and argument mismatches.
    pub fn client_message(&self, method: &str) -> String {
        match self {
            Self::Client(message) => message.clone(),
            Self::InvalidArguments(detail) => {
                format!("Failed to invoke '{method}' due to an error on the server: {detail}")
            }
            Self::Store(e) if e.is_transient() => format!(
                "Failed to invoke '{method}': the connection store is unavailable; try again later."
            ),
            Self::Backplane(e) if e.is_transient() => format!(
                "Failed to invoke '{method}': the servers cannot reach each other right now; try again later."
            ),
            Self::Store(_) | Self::Backplane(_) | Self::Serialize(_) => {
                format!("An unexpected error occurred invoking '{method}' on the server.")
            }
        }
    }
}

impl From<DeliveryError> for HubError {
    fn from(error: DeliveryError) -> Self {
        match error {
            DeliveryError::Store(e) => Self::Store(e),
        }
    }
}

/// Everything a hub method knows about its caller, and the way to reach other clients.
#[derive(Clone)]
pub struct HubContext {
    user: UserId,
    connection_id: ConnectionId,
    clients: Clients,
}

impl fmt::Debug for HubContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HubContext")
            .field("user", &self.user)
            .field("connection_id", &self.connection_id)
            .finish_non_exhaustive()
    }
}

impl HubContext {
    pub(crate) fn new(router: Arc<Router>, user: UserId, connection_id: ConnectionId) -> Self {
        Self {
            clients: Clients {
                router,
                caller: connection_id.clone(),
            },
            user,
            connection_id,
        }
    }

    /// The caller's user, taken from the verified access token.
    pub fn user(&self) -> &UserId {
        &self.user
    }

    /// The caller's public connection id.
    pub fn connection_id(&self) -> &ConnectionId {
        &self.connection_id
    }

    /// Proxies to call methods on clients.
    pub fn clients(&self) -> &Clients {
        &self.clients
    }
}

/// Picks which clients to call.
#[derive(Clone)]
pub struct Clients {
    router: Arc<Router>,
    caller: ConnectionId,
}

impl Clients {
    /// The calling connection.
    pub fn caller(&self) -> ClientProxy<'_> {
        self.proxy(Target::Connection(self.caller.clone()))
    }

    /// One connection, by its public id, on whichever node holds it (the id names its node).
    pub fn client(&self, id: &ConnectionId) -> ClientProxy<'_> {
        self.proxy(Target::Connection(id.clone()))
    }

    /// Every live connection of a user (every device and tab), on every node.
    pub fn user(&self, user: &UserId) -> ClientProxy<'_> {
        self.proxy(Target::User(user.clone()))
    }

    /// Every member of a group: on this node directly, on other nodes through the backplane.
    /// Without a backplane, only the members on this node.
    pub fn group(&self, group: &str) -> ClientProxy<'_> {
        self.proxy(Target::Group(Arc::from(group)))
    }

    /// Every connection of this hub: on this node directly, on other nodes through the
    /// backplane. Without a backplane, only the connections on this node.
    pub fn all(&self) -> ClientProxy<'_> {
        self.proxy(Target::All)
    }

    /// Adds the calling connection to a group. With a backplane, the node subscribes to the
    /// group's channel when this is the group's first member here.
    ///
    /// # Errors
    ///
    /// [`HubError::Backplane`] when the node could not subscribe; the connection is then not a
    /// member.
    pub async fn join_group(&self, group: &str) -> Result<(), HubError> {
        let router = &self.router;
        if router.registry.join(&self.caller, group) != Joined::Now {
            return Ok(());
        }
        let Some(backplane) = router.channels() else {
            return Ok(());
        };
        let address = Address::Group(Arc::from(group));
        if let Err(e) = router.subscriptions.acquire(&**backplane, &address).await {
            let _ = router.registry.leave(&self.caller, group);
            return Err(e.into());
        }
        Ok(())
    }

    /// Takes the calling connection out of a group. Returns whether it was a member.
    ///
    /// # Errors
    ///
    /// None today; fallible so that groups held elsewhere can be left the same way.
    pub async fn leave_group(&self, group: &str) -> Result<bool, HubError> {
        let router = &self.router;
        if !router.registry.leave(&self.caller, group) {
            return Ok(false);
        }
        if let Some(backplane) = router.channels() {
            router
                .subscriptions
                .release(&**backplane, &Address::Group(Arc::from(group)))
                .await;
        }
        Ok(true)
    }

    fn proxy(&self, target: Target) -> ClientProxy<'_> {
        ClientProxy {
            router: &self.router,
            target,
        }
    }
}

/// Calls a client method on the chosen connections.
pub struct ClientProxy<'a> {
    router: &'a Router,
    target: Target,
}

impl<'a> ClientProxy<'a> {
    pub(crate) fn new(router: &'a Router, target: Target) -> Self {
        Self { router, target }
    }
}

impl ClientProxy<'_> {
    /// Calls `method` with `arguments` (anything serializing to a JSON array, usually a tuple:
    /// `&("text",)`) on every chosen connection, exactly once each. The message is serialized
    /// once for all recipients, on every node. Returns what it reached: connections here,
    /// connections handed to other nodes, channel publications, and what could not be
    /// reached (see [`Delivery`]).
    ///
    /// A recipient whose queue is full makes this call wait for room (up to
    /// [`HubOptions::send_timeout`](crate::HubOptions::send_timeout)): a fast sender is slowed
    /// down to what its recipients read; a recipient that stops reading is closed.
    ///
    /// # Errors
    ///
    /// [`HubError::Serialize`] when the arguments do not serialize to an array;
    /// [`HubError::Store`] when looking up a user's connections failed.
    pub async fn send<A: Serialize + ?Sized>(
        &self,
        method: &str,
        arguments: &A,
    ) -> Result<Delivery, HubError> {
        let record = crate::protocol::invocation(method, &arguments)?;
        Ok(self.router.deliver(&self.target, record.into()).await?)
    }
}

struct Method {
    name: String,
    call: Box<MethodFn>,
}

/// A hub: named methods and lifecycle hooks.
#[derive(Default)]
pub struct Hub {
    /// Hubs have a handful of methods: a short list matched case-insensitively beats hashing
    /// a lower-cased copy of every incoming name.
    methods: Vec<Method>,
    on_connected: Option<Box<HookFn>>,
    on_disconnected: Option<Box<HookFn>>,
    on_reconnected: Option<Box<HookFn>>,
}

impl fmt::Debug for Hub {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut names: Vec<&str> = self.methods.iter().map(|m| m.name.as_str()).collect();
        names.sort_unstable();
        f.debug_struct("Hub")
            .field("methods", &names)
            .finish_non_exhaustive()
    }
}

impl Hub {
    /// A hub without methods.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a method clients can invoke by `name` (matched case-insensitively). `A` is the
    /// argument tuple, decoded from the invocation's JSON array: `(String, u32)` for two
    /// arguments, `(String,)` for one, `()` for none. The result `R` is sent in the Completion
    /// (`()` sends `null`). Adding a name twice replaces the earlier method.
    #[must_use]
    pub fn method<A, R, F, Fut>(mut self, name: &str, handler: F) -> Self
    where
        A: DeserializeOwned + Send + 'static,
        R: Serialize + Send + 'static,
        F: Fn(HubContext, A) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<R, HubError>> + Send + 'static,
    {
        let handler = Arc::new(handler);
        let call = move |ctx: HubContext, raw: &RawValue| {
            let args: A = decode_arguments(raw)?;
            let handler = handler.clone();
            let fut: BoxFuture<Result<Box<RawValue>, HubError>> = Box::pin(async move {
                let result = handler(ctx, args).await?;
                Ok(serde_json::value::to_raw_value(&result)?)
            });
            Ok(fut)
        };
        self.methods.retain(|m| !m.name.eq_ignore_ascii_case(name));
        self.methods.push(Method {
            name: name.to_owned(),
            call: Box::new(call),
        });
        self
    }

    /// Runs after the connection was recorded in the store.
    #[must_use]
    pub fn on_connected<F, Fut>(mut self, hook: F) -> Self
    where
        F: Fn(HubContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.on_connected = Some(Box::new(move |ctx| Box::pin(hook(ctx))));
        self
    }

    /// Runs when the connection ends, on every exit path, before it is removed from the store.
    #[must_use]
    pub fn on_disconnected<F, Fut>(mut self, hook: F) -> Self
    where
        F: Fn(HubContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.on_disconnected = Some(Box::new(move |ctx| Box::pin(hook(ctx))));
        self
    }

    /// Runs after a client re-attached to its connection (stateful reconnect) and the
    /// connection was recorded again.
    #[must_use]
    pub fn on_reconnected<F, Fut>(mut self, hook: F) -> Self
    where
        F: Fn(HubContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.on_reconnected = Some(Box::new(move |ctx| Box::pin(hook(ctx))));
        self
    }

    /// Whether a method of that name (case-insensitive) exists.
    pub fn has_method(&self, name: &str) -> bool {
        self.find(name).is_some()
    }

    fn find(&self, name: &str) -> Option<&Method> {
        self.methods
            .iter()
            .find(|m| m.name.eq_ignore_ascii_case(name))
    }

    /// Starts a call: decodes the arguments and returns the method's future.
    pub(crate) fn invoke(
        &self,
        ctx: HubContext,
        name: &str,
        arguments: &RawValue,
    ) -> Result<BoxFuture<Result<Box<RawValue>, HubError>>, InvokeError> {
        let method = self.find(name).ok_or(InvokeError::UnknownMethod)?;
        (method.call)(ctx, arguments).map_err(InvokeError::Hub)
    }

    pub(crate) fn connected_hook(&self, ctx: HubContext) -> Option<BoxFuture<()>> {
        self.on_connected.as_ref().map(|hook| hook(ctx))
    }

    pub(crate) fn disconnected_hook(&self, ctx: HubContext) -> Option<BoxFuture<()>> {
        self.on_disconnected.as_ref().map(|hook| hook(ctx))
    }

    pub(crate) fn reconnected_hook(&self, ctx: HubContext) -> Option<BoxFuture<()>> {
        self.on_reconnected.as_ref().map(|hook| hook(ctx))
    }
}

/// Decodes an invocation's argument array into the method's tuple. An empty array also
/// decodes into `()`, the argument type of a method without parameters.
fn decode_arguments<A: DeserializeOwned>(raw: &RawValue) -> Result<A, HubError> {
    serde_json::from_str(raw.get()).or_else(|error| {
        let empty = raw
            .get()
            .strip_prefix('[')
            .and_then(|inner| inner.strip_suffix(']'))
            .is_some_and(|inner| inner.trim().is_empty());
        if empty {
            serde_json::from_str("null").map_err(|_| HubError::InvalidArguments(error.to_string()))
        } else {
            Err(HubError::InvalidArguments(error.to_string()))
        }
    })
}

/// Why an invocation could not start.
#[derive(Debug)]
pub(crate) enum InvokeError {
    UnknownMethod,
    Hub(HubError),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_match_case_insensitively_and_a_redefinition_replaces() {
        let hub = Hub::new()
            .method("Ping", |_ctx: HubContext, (): ()| async {
                Ok::<_, HubError>(1)
            })
            .method("PING", |_ctx: HubContext, (): ()| async {
                Ok::<_, HubError>(2)
            });
        assert!(hub.has_method("ping"));
        assert!(!hub.has_method("pong"));
        assert_eq!(hub.methods.len(), 1);
        assert_eq!(hub.methods[0].name, "PING");
    }

    #[test]
    fn empty_argument_arrays_decode_into_unit() {
        let empty = RawValue::from_string("[ ]".into()).expect("valid");
        assert!(decode_arguments::<()>(&empty).is_ok());
        let nested = RawValue::from_string("[[]]".into()).expect("valid");
        assert!(decode_arguments::<()>(&nested).is_err());
        let two = RawValue::from_string(r#"["a", 1]"#.into()).expect("valid");
        assert!(decode_arguments::<(String, u32)>(&two).is_ok());
        assert!(decode_arguments::<(String,)>(&two).is_err());
    }
}
