//! One connection's life: handshake, message loop, keep-alive, and the cleanup that runs on
//! every exit path.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::SystemTime;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use bytes::Bytes;
use futures_util::{FutureExt, SinkExt};
use serde_json::value::RawValue;
use switchboard_core::{ConnectionId, ConnectionRecord, UserId};
use tokio::time::{Instant, sleep_until, timeout};
use tracing::{Instrument, debug, error, info_span, warn};

use crate::delivery::user_group;
use crate::hub::{HubContext, InvokeError};
use crate::protocol::{self, ClientMessage, ProtocolError, RecordReader};
use crate::registry::Outgoing;
use crate::service::Inner;

/// Who is behind a connection that is about to start.
#[derive(Debug)]
pub(crate) struct ConnectionInfo {
    pub(crate) id: ConnectionId,
    pub(crate) token: Option<Box<str>>,
    pub(crate) user: UserId,
    pub(crate) user_agent: Option<String>,
}

/// How a session ended.
#[derive(Debug)]
enum End {
    /// The client closed (Close message, close frame, or the socket ended).
    ClientClosed,
    /// The socket failed.
    SocketError(axum::Error),
    /// We closed it, with this reason.
    Closed(String),
    /// The client stopped reading; we dropped it without a goodbye it would not read.
    Unresponsive(String),
}

/// Most queued records written per flush.
const WRITE_BATCH: usize = 64;

/// Runs a connection to the end and always cleans up: removes it from the local registry and
/// from the store, runs `on_disconnected` if `on_connected` ran, and releases its token.
pub(crate) async fn run(inner: Arc<Inner>, socket: WebSocket, info: ConnectionInfo) {
    let span = info_span!("connection", id = %info.id, user = %info.user);
    async move {
        let _active = inner.active.enter();
        let mut connected = false;
        let outcome = AssertUnwindSafe(serve(&inner, socket, &info, &mut connected))
            .catch_unwind()
            .await;
        match outcome {
            Ok(End::ClientClosed) => debug!("client closed the connection"),
            Ok(End::SocketError(e)) => debug!(error = %e, "socket error"),
            Ok(End::Closed(reason)) => debug!(%reason, "server closed the connection"),
            Ok(End::Unresponsive(reason)) => warn!(%reason, "dropped an unresponsive client"),
            Err(_) => error!("the connection task panicked; cleaning up"),
        }
        cleanup(&inner, &info, connected).await;
    }
    .instrument(span)
    .await;
}

async fn cleanup(inner: &Inner, info: &ConnectionInfo, connected: bool) {
    if let Some(token) = &info.token {
        inner.tokens.remove(token);
    }
    if connected {
        let ctx = HubContext::new(inner.core.clone(), info.user.clone(), info.id.clone());
        if let Some(hook) = inner.hub.disconnected_hook(ctx)
            && AssertUnwindSafe(hook).catch_unwind().await.is_err()
        {
            error!("on_disconnected panicked");
        }
    }
    inner.core.registry.remove(&info.id);
    if connected {
        match inner.core.store.remove(&info.user, &info.id).await {
            Ok(_) => {}
            Err(e) => {
                error!(error = %e, "could not remove the connection from the store; the node's sweep or lease expiry will")
            }
        }
    }
}

/// The per-connection state of the message loop.
struct Session<'a> {
    inner: &'a Inner,
    info: &'a ConnectionInfo,
    socket: WebSocket,
    rx: tokio::sync::mpsc::Receiver<Outgoing>,
    last_write: Instant,
    last_read: Instant,
}

async fn serve(
    inner: &Inner,
    mut socket: WebSocket,
    info: &ConnectionInfo,
    connected: &mut bool,
) -> End {
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
    match handshake {
        Ok(_version) => {}
        Err(HandshakeEnd::Protocol(e)) => {
            let text = protocol::handshake_error(&e.to_string());
            let _ = socket.send(Message::Text(text.into())).await;
            close_socket(&mut socket).await;
            return End::Closed(e.to_string());
        }
        Err(HandshakeEnd::Socket(end)) => return end,
    }
    if let Err(e) = socket
        .send(Message::Text(Utf8Bytes::from_static(
            protocol::HANDSHAKE_OK,
        )))
        .await
    {
        return End::SocketError(e);
    }

    // Register locally first, so deliveries that find the new record also find the socket.
    let core = &inner.core;
    let (rx, overflow) = core
        .registry
        .insert(info.id.clone(), options.send_queue_capacity);
    let mut record = ConnectionRecord::new(
        info.id.clone(),
        info.user.clone(),
        core.node.clone(),
        SystemTime::now(),
    );
    if let Some(ua) = &info.user_agent {
        record = record.with_user_agent(ua);
    }
    if let Err(e) = core.store.add(record).await {
        error!(error = %e, "could not record the connection");
        let reason = "The connection store is unavailable; try again later.".to_owned();
        let _ = socket
            .send(Message::Text(protocol::close(Some(&reason), true).into()))
            .await;
        close_socket(&mut socket).await;
        return End::Closed(reason);
    }
    *connected = true;
    if !core.capabilities.lookup {
        core.registry.join(&info.id, &user_group(&info.user));
    }
    let ctx = HubContext::new(core.clone(), info.user.clone(), info.id.clone());
    if let Some(hook) = inner.hub.connected_hook(ctx) {
        hook.await;
    }

    let now = Instant::now();
    let mut session = Session {
        inner,
        info,
        socket,
        rx,
        last_write: now,
        last_read: now,
    };
    if !early.is_empty()
        && let Err(end) = session.handle_records(&early).await
    {
        return session.finish(Err(end)).await;
    }
    let end = session.message_loop(&mut reader, &overflow).await;
    session.finish(end).await
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
            None => return Err(HandshakeEnd::Socket(End::ClientClosed)),
            Some(Err(e)) => return Err(HandshakeEnd::Socket(End::SocketError(e))),
            Some(Ok(Message::Text(text))) => Bytes::from(text),
            Some(Ok(Message::Binary(_))) => {
                return Err(HandshakeEnd::Protocol(ProtocolError::Handshake(
                    "the handshake must be sent in a text frame".into(),
                )));
            }
            Some(Ok(Message::Close(_))) => return Err(HandshakeEnd::Socket(End::ClientClosed)),
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

fn not_reading(limit: std::time::Duration) -> End {
    End::Unresponsive(format!(
        "The client did not read its messages for {limit:?}."
    ))
}

async fn close_socket(socket: &mut WebSocket) {
    let _ = socket
        .send(Message::Close(Some(CloseFrame {
            code: 1000,
            reason: Utf8Bytes::from_static(""),
        })))
        .await;
}

impl Session<'_> {
    async fn message_loop(
        &mut self,
        reader: &mut RecordReader,
        overflow: &tokio::sync::Notify,
    ) -> Result<(), End> {
        let options = &self.inner.options;
        let mut shutdown = self.inner.shutdown.subscribe();
        let timer = sleep_until(self.next_deadline());
        tokio::pin!(timer);
        loop {
            tokio::select! {
                biased;
                Ok(()) = shutdown.changed() => {
                    return Err(End::Closed("the server is shutting down".into()));
                }
                () = overflow.notified() => {
                    return Err(End::Unresponsive(format!(
                        "The client is not reading its messages: {} records are waiting.",
                        options.send_queue_capacity
                    )));
                }
                Some(out) = self.rx.recv() => {
                    self.write_batch(out).await?;
                }
                frame = self.socket.recv() => {
                    let frame = match frame {
                        None | Some(Ok(Message::Close(_))) => return Err(End::ClientClosed),
                        Some(Err(e)) => return Err(End::SocketError(e)),
                        Some(Ok(Message::Text(text))) => Bytes::from(text),
                        Some(Ok(Message::Binary(_))) => {
                            return Err(End::Closed(ProtocolError::BinaryFrame.to_string()));
                        }
                        Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                    };
                    self.last_read = Instant::now();
                    let whole = reader
                        .complete(frame, options.max_record_size)
                        .map_err(|e| End::Closed(e.to_string()))?;
                    self.handle_records(&whole).await?;
                }
                () = &mut timer => {
                    let now = Instant::now();
                    if now.duration_since(self.last_read) >= options.client_timeout {
                        return Err(End::Closed(format!(
                            "Client timeout: nothing was received for {:?}.",
                            options.client_timeout
                        )));
                    }
                    if now.duration_since(self.last_write) >= options.keep_alive_interval {
                        self.write(Utf8Bytes::from_static(protocol::PING)).await?;
                        self.flush().await?;
                    }
                    timer.as_mut().reset(self.next_deadline());
                }
            }
        }
    }

    fn next_deadline(&self) -> Instant {
        let options = &self.inner.options;
        (self.last_write + options.keep_alive_interval).min(self.last_read + options.client_timeout)
    }

    /// Sends the closing messages that fit how the session ended.
    async fn finish(mut self, end: Result<(), End>) -> End {
        let end = match end {
            Ok(()) => End::ClientClosed,
            Err(end) => end,
        };
        if let End::Closed(reason) = &end {
            let shutting_down = *self.inner.shutdown.borrow();
            let message = if shutting_down {
                protocol::close(None, true)
            } else {
                protocol::close(Some(reason), false)
            };
            let _ = self.drain_queue().await;
            let _ = self.write(message.into()).await;
            let _ = self.flush().await;
            let _ = timeout(
                self.inner.options.client_timeout,
                close_socket(&mut self.socket),
            )
            .await;
        }
        end
    }

    /// Queues a text frame on the socket. A client that stops reading cannot block the
    /// session longer than the client timeout.
    async fn write(&mut self, text: Utf8Bytes) -> Result<(), End> {
        let limit = self.inner.options.client_timeout;
        match timeout(limit, self.socket.feed(Message::Text(text))).await {
            Ok(result) => result.map_err(End::SocketError),
            Err(_) => Err(not_reading(limit)),
        }
    }

    async fn flush(&mut self) -> Result<(), End> {
        let limit = self.inner.options.client_timeout;
        let result = match timeout(limit, self.socket.flush()).await {
            Ok(result) => result.map_err(End::SocketError),
            Err(_) => Err(not_reading(limit)),
        };
        self.last_write = Instant::now();
        result
    }

    /// Writes `first` and whatever else is queued (up to a batch), then flushes once.
    async fn write_batch(&mut self, first: Outgoing) -> Result<(), End> {
        let Outgoing::Record(text) = first;
        self.write(text).await?;
        for _ in 1..WRITE_BATCH {
            match self.rx.try_recv() {
                Ok(Outgoing::Record(text)) => self.write(text).await?,
                Err(_) => break,
            }
        }
        self.flush().await
    }

    /// Writes everything queued so far (keeps sends of a method ahead of its Completion).
    async fn drain_queue(&mut self) -> Result<(), End> {
        while let Ok(Outgoing::Record(text)) = self.rx.try_recv() {
            self.write(text).await?;
        }
        Ok(())
    }

    async fn handle_records(&mut self, whole: &Bytes) -> Result<(), End> {
        let max = self.inner.options.max_record_size;
        for record in protocol::records(whole) {
            protocol::check_size(record, max).map_err(|e| End::Closed(e.to_string()))?;
            let message =
                protocol::parse_message(record).map_err(|e| End::Closed(e.to_string()))?;
            match message {
                ClientMessage::Invocation {
                    invocation_id,
                    target,
                    arguments,
                    has_streams,
                } => {
                    let reply = if has_streams {
                        Err("Client-to-server streaming is not supported.".to_owned())
                    } else {
                        invoke(self.inner, self.info, &target, arguments).await
                    };
                    self.complete(invocation_id.as_deref(), &target, reply)
                        .await?;
                }
                ClientMessage::StreamInvocation {
                    invocation_id,
                    target,
                } => {
                    let reply = Err(format!(
                        "Failed to invoke '{target}': streaming hub methods are not supported."
                    ));
                    self.complete(Some(&invocation_id), &target, reply).await?;
                }
                ClientMessage::Ping => {}
                ClientMessage::Close => return Err(End::ClientClosed),
                ClientMessage::Ack(_) | ClientMessage::Sequence(_) => {
                    debug!("ignoring a stateful-reconnect message on a connection without it");
                }
                ClientMessage::Ignored(kind) => debug!(kind, "ignoring a message"),
            }
        }
        Ok(())
    }

    /// Sends the Completion of an invocation that has an id; for one without, only logs
    /// failures (the protocol forbids answering it).
    async fn complete(
        &mut self,
        invocation_id: Option<&str>,
        target: &str,
        reply: Result<Box<RawValue>, String>,
    ) -> Result<(), End> {
        let Some(id) = invocation_id else {
            if let Err(error) = reply {
                debug!(method = target, %error, "non-blocking invocation failed");
            }
            // Whatever the method queued for this connection goes out with the next batch.
            return Ok(());
        };
        let completion = match reply {
            Ok(result) => protocol::completion_ok(id, &result),
            Err(error) => protocol::completion_error(id, &error),
        };
        self.drain_queue().await?;
        self.write(completion.into()).await?;
        self.flush().await
    }
}

/// Runs one hub method; `Ok` carries the result, `Err` the text for the caller.
async fn invoke(
    inner: &Inner,
    info: &ConnectionInfo,
    target: &str,
    arguments: &RawValue,
) -> Result<Box<RawValue>, String> {
    let ctx = HubContext::new(inner.core.clone(), info.user.clone(), info.id.clone());
    let call = match inner.hub.invoke(ctx, target, arguments) {
        Ok(call) => call,
        Err(InvokeError::UnknownMethod) => {
            return Err(format!("Unknown hub method '{target}'"));
        }
        Err(InvokeError::Hub(e)) => return Err(e.client_message(target)),
    };
    match AssertUnwindSafe(call).catch_unwind().await {
        Ok(Ok(result)) => Ok(result),
        Ok(Err(e)) => {
            warn!(method = target, error = %e, "hub method failed");
            Err(e.client_message(target))
        }
        Err(_) => {
            error!(method = target, "hub method panicked");
            Err(format!(
                "An unexpected error occurred invoking '{target}' on the server."
            ))
        }
    }
}
