//! Opening a connection: the handshake, registration in the local registry and the store,
//! `on_connected`, and the handshake answer.

use std::time::SystemTime;

use axum::extract::ws::{Message, Utf8Bytes, WebSocket};
use bytes::Bytes;
use switchboard_core::{Address, ConnectionRecord, StoreError};
use tokio::time::{Instant, timeout};
use tracing::error;

use super::calls::Calls;
use super::stateful::Stateful;
use super::{ConnectionInfo, End, Reattach, STORE_FAILED, Session, close_socket};
use crate::hub::HubContext;
use crate::protocol::{self, ProtocolError, RecordReader};
use crate::registry::TooManyConnections;
use crate::state::Shared;

/// What the client sees when the store could not record its connection for a while.
pub(super) const STORE_UNAVAILABLE: &str = "The connection store is unavailable; try again later.";

/// What the client sees when the backplane could not subscribe to its user's channel.
pub(super) const BACKPLANE_UNAVAILABLE: &str =
    "The servers cannot reach each other right now; try again later.";

/// The store record of a connection, as this node holds it now.
pub(super) fn record_of(inner: &Shared, info: &ConnectionInfo) -> ConnectionRecord {
    let record = ConnectionRecord::new(
        info.id.clone(),
        info.user.clone(),
        inner.router.node.clone(),
        SystemTime::now(),
    );
    match &info.user_agent {
        Some(ua) => record.with_user_agent(ua),
        None => record,
    }
}

/// Handshake, registration in the local registry and the store, and `on_connected`. Returns
/// the session, its record reader and any records that followed the handshake.
pub(super) async fn open<'a>(
    inner: &'a Shared,
    mut socket: WebSocket,
    info: &'a ConnectionInfo,
    reattach: Option<Reattach>,
    connected: &mut bool,
) -> Result<(Session<'a>, RecordReader, Bytes), End> {
    let options = &inner.options;
    let mut reader = RecordReader::default();
    // Records that arrived in the same frame right after the handshake.
    let mut early = Bytes::new();
    let handshake = timeout(
        options.handshake_timeout,
        read_handshake(
            &mut socket,
            &mut reader,
            options.max_record_size,
            &mut early,
        ),
    )
    .await
    .unwrap_or(Err(HandshakeEnd::Protocol(
        ProtocolError::HandshakeTimeout(options.handshake_timeout),
    )));
    let version = match handshake {
        Ok(version) => version,
        Err(HandshakeEnd::Protocol(e)) => return Err(refuse(&mut socket, e.to_string()).await),
        Err(HandshakeEnd::Socket(end)) => return Err(end),
    };
    // Stateful reconnect needs both the negotiation and handshake version 2.
    let stateful = match reattach {
        Some(reattach) if version >= 2 => Some(Stateful::new(reattach)),
        _ => {
            if let Some(token) = &info.token {
                inner.forbid_reattach(token);
            }
            None
        }
    };
    // Register locally, then in the store, then answer the handshake: once a client's start()
    // resolves, messages to its user reach it. Anything sent to it meanwhile waits in its
    // mailbox and follows the handshake answer. Register locally first, so deliveries that
    // find the new record also find the socket.
    let router = &inner.router;
    let record = record_of(inner, info);
    let mailbox = match router.registry.insert(
        &record,
        info.user_agent.as_ref(),
        options.send_queue_size,
        options.max_connections_per_user,
    ) {
        Ok(mailbox) => mailbox,
        Err(TooManyConnections { limit }) => {
            return Err(refuse(&mut socket, too_many_connections(limit)).await);
        }
    };
    // Without lookup, messages to a user travel on the user's channel: this node listens to
    // it while it holds one of the user's connections.
    if router.user_channels()
        && let Some(backplane) = router.channels()
        && let Err(e) = router
            .subscriptions
            .acquire(&**backplane, &Address::User(info.user.clone()))
            .await
    {
        let _ = router.registry.remove(&info.id);
        if let Some(suppressed) = STORE_FAILED.allow() {
            error!(connection = %info.id, user = %info.user, error = %e, suppressed, "could not subscribe to the user's channel");
        }
        return Err(unavailable(&mut socket, BACKPLANE_UNAVAILABLE).await);
    }
    if let Err(e) = router.store.add(record).await {
        if let Some(suppressed) = STORE_FAILED.allow() {
            error!(connection = %info.id, user = %info.user, error = %e, suppressed, "could not record the connection");
        }
        return Err(store_refusal(&mut socket, &e).await);
    }
    *connected = true;
    let ctx = HubContext::new(router.clone(), info.user.clone(), info.id.clone());
    if let Some(hook) = inner.hub.connected_hook(ctx) {
        hook.await;
    }
    if let Err(e) = socket
        .send(Message::Text(Utf8Bytes::from_static(
            protocol::HANDSHAKE_OK,
        )))
        .await
    {
        return Err(End::TransportLost(Some(e)));
    }

    let now = Instant::now();
    let session = Session {
        inner,
        info,
        socket,
        mailbox,
        batch: Vec::new(),
        last_write: now,
        last_read: now,
        stateful,
        calls: Calls::new(options),
    };
    Ok((session, reader, early))
}

/// The text a client gets when its user holds too many connections.
pub(crate) fn too_many_connections(limit: usize) -> String {
    format!("Too many connections: a user may hold at most {limit} connections at once.")
}

/// Refuses the connection with a handshake error: the client's `start()` fails with `reason`
/// and does not retry by itself.
async fn refuse(socket: &mut WebSocket, reason: String) -> End {
    let text = protocol::handshake_error(&reason);
    let _ = socket.send(Message::Text(text.into())).await;
    close_socket(socket).await;
    End::closed(reason)
}

/// Answers a store failure while recording the connection: a transient one invites the client
/// to reconnect; a refusal or a permanent failure is an error it should not retry.
async fn store_refusal(socket: &mut WebSocket, e: &StoreError) -> End {
    if !e.is_transient() {
        let reason = match e {
            StoreError::Refused { reason } => reason.clone(),
            _ => "The server could not record the connection.".to_owned(),
        };
        return refuse(socket, reason).await;
    }
    unavailable(socket, STORE_UNAVAILABLE).await
}

/// Answers the handshake and closes at once with `reason`, inviting the client to reconnect:
/// the failure is transient.
async fn unavailable(socket: &mut WebSocket, reason: &'static str) -> End {
    let _ = socket
        .send(Message::Text(Utf8Bytes::from_static(
            protocol::HANDSHAKE_OK,
        )))
        .await;
    let _ = socket
        .send(Message::Text(protocol::close(Some(reason), true).into()))
        .await;
    close_socket(socket).await;
    End::Closed {
        reason: reason.to_owned(),
        reconnect: true,
    }
}

enum HandshakeEnd {
    Protocol(ProtocolError),
    Socket(End),
}

/// Reads frames until the first whole record, parses it as the handshake, and leaves any
/// records after it in `early`.
async fn read_handshake(
    socket: &mut WebSocket,
    reader: &mut RecordReader,
    max_record: usize,
    early: &mut Bytes,
) -> Result<u8, HandshakeEnd> {
    loop {
        let frame = match socket.recv().await {
            None | Some(Ok(Message::Close(_))) => {
                return Err(HandshakeEnd::Socket(End::TransportLost(None)));
            }
            Some(Err(e)) => return Err(HandshakeEnd::Socket(End::TransportLost(Some(e)))),
            Some(Ok(Message::Text(text))) => Bytes::from(text),
            Some(Ok(Message::Binary(frame))) => {
                return Err(HandshakeEnd::Protocol(protocol::binary_handshake_error(
                    &frame,
                )));
            }
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
        };
        let whole = reader
            .complete(frame, max_record)
            .map_err(HandshakeEnd::Protocol)?;
        let Some(sep) = whole.iter().position(|&b| b == protocol::RECORD_SEPARATOR) else {
            continue;
        };
        let handshake = &whole[..sep];
        protocol::check_size(handshake, max_record).map_err(HandshakeEnd::Protocol)?;
        let version = protocol::parse_handshake(handshake).map_err(HandshakeEnd::Protocol)?;
        *early = whole.slice(sep + 1..);
        return Ok(version);
    }
}
