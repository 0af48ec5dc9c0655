//! One connection's life: handshake, message loop, keep-alive, stateful reconnect, and the
//! cleanup that runs on every exit path.
//!
//! # Stateful reconnect
//!
//! When a client negotiated stateful reconnect and handshook with version 2, the session
//! numbers every trackable record it sends (invocations and completions), keeps them until the
//! client acknowledges them, and counts the trackable records it receives. If the socket drops
//! without a Close message, the connection stays alive — in the local registry and in the
//! store — for [`HubOptions::reconnect_window`](crate::HubOptions::reconnect_window), collecting
//! messages for the client. A new WebSocket presenting the same connection token (and a token
//! for the same user) takes over: the session sends a Sequence message and replays every
//! unacknowledged record, suppresses records the client re-sends that it already processed,
//! re-records the connection in the store and runs `on_reconnected`.

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use bytes::Bytes;
use futures_util::{FutureExt, SinkExt};
use serde_json::value::RawValue;
use switchboard_core::{ConnectionId, ConnectionRecord, UserId};
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep_until, timeout};
use tracing::{Instrument, debug, debug_span, error, warn};

use crate::delivery::user_group;
use crate::hub::{HubContext, InvokeError};
use crate::protocol::{self, ClientMessage, ProtocolError, RecordReader, kind};
use crate::registry::{Mailbox, MailboxEvent};
use crate::service::Inner;

/// Who is behind a connection that is about to start.
#[derive(Debug)]
pub(crate) struct ConnectionInfo {
    pub(crate) id: ConnectionId,
    pub(crate) token: Option<Box<str>>,
    pub(crate) user: UserId,
    pub(crate) user_agent: Option<String>,
}

/// New transports for a connection that negotiated stateful reconnect.
pub(crate) type Reattach = mpsc::Receiver<WebSocket>;

/// How a session (or one of its transports) ended.
#[derive(Debug)]
enum End {
    /// The client said goodbye with a Close message.
    ClientClosed,
    /// The transport went away without a Close message (close frame, EOF, socket error).
    TransportLost(Option<axum::Error>),
    /// We closed it, with this reason.
    Closed(String),
    /// The client stopped reading; we dropped it without a goodbye it would not read.
    Unresponsive(String),
}

/// Most queued records written per flush.
const WRITE_BATCH: usize = 64;

/// How long after receiving trackable records an Ack is sent (stateful reconnect).
const ACK_DELAY: Duration = Duration::from_secs(1);

/// Runs a connection to the end and always cleans up: removes it from the local registry and
/// from the store, runs `on_disconnected` if `on_connected` ran, and releases its token.
pub(crate) async fn run(
    inner: Arc<Inner>,
    socket: WebSocket,
    info: ConnectionInfo,
    reattach: Option<Reattach>,
) {
    // A debug span: free unless debug logging is on. Warnings and errors name the connection
    // themselves.
    let span = debug_span!("connection", id = %info.id, user = %info.user);
    async move {
        let _active = inner.active.enter();
        let mut connected = false;
        let outcome = AssertUnwindSafe(serve(&inner, socket, &info, reattach, &mut connected))
            .catch_unwind()
            .await;
        match outcome {
            Ok(End::ClientClosed) => debug!("client closed the connection"),
            Ok(End::TransportLost(e)) => debug!(error = ?e, "transport lost"),
            Ok(End::Closed(reason)) => debug!(%reason, "server closed the connection"),
            Ok(End::Unresponsive(reason)) => warn!(
                connection = %info.id,
                user = %info.user,
                %reason,
                "dropped an unresponsive client"
            ),
            Err(_) => error!(
                connection = %info.id,
                user = %info.user,
                "the connection task panicked; cleaning up"
            ),
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
            error!(connection = %info.id, user = %info.user, "on_disconnected panicked");
        }
    }
    inner.core.registry.remove(&info.id);
    if connected && let Err(e) = inner.core.store.remove(&info.user, &info.id).await {
        error!(
            connection = %info.id,
            user = %info.user,
            error = %e,
            "could not remove the connection from the store; it stays until this node's lease expires"
        );
    }
}

fn record_of(inner: &Inner, info: &ConnectionInfo) -> ConnectionRecord {
    let record = ConnectionRecord::new(
        info.id.clone(),
        info.user.clone(),
        inner.core.node.clone(),
        SystemTime::now(),
    );
    match &info.user_agent {
        Some(ua) => record.with_user_agent(ua),
        None => record,
    }
}

async fn serve(
    inner: &Inner,
    socket: WebSocket,
    info: &ConnectionInfo,
    reattach: Option<Reattach>,
    connected: &mut bool,
) -> End {
    // Boxed: the set-up's locals are freed once it is done, so a live connection's future
    // holds only the session.
    let (mut session, mut reader, early) =
        match Box::pin(open(inner, socket, info, reattach, connected)).await {
            Ok(opened) => opened,
            Err(end) => return end,
        };
    if !early.is_empty()
        && let Err(end) = Box::pin(session.handle_records(&early)).await
    {
        return Box::pin(session.finish(end)).await;
    }
    loop {
        let end = session.transport_loop(&mut reader).await;
        match end {
            End::TransportLost(e) if session.stateful.is_some() && !inner.shutting_down() => {
                debug!(error = ?e, "transport lost; waiting for the client to re-attach");
                match Box::pin(session.wait_for_reattach()).await {
                    Ok(socket) => {
                        reader = RecordReader::default();
                        if let Err(end) = Box::pin(session.resume(socket)).await {
                            return Box::pin(session.finish(end)).await;
                        }
                    }
                    Err(end) => return end,
                }
            }
            end => return Box::pin(session.finish(end)).await,
        }
    }
}

/// Handshake, registration in the local registry and the store, and `on_connected`. Returns
/// the session, its record reader and any records that followed the handshake.
async fn open<'a>(
    inner: &'a Inner,
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
        Err(HandshakeEnd::Protocol(e)) => {
            let text = protocol::handshake_error(&e.to_string());
            let _ = socket.send(Message::Text(text.into())).await;
            close_socket(&mut socket).await;
            return Err(End::Closed(e.to_string()));
        }
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
    let core = &inner.core;
    let mailbox = core
        .registry
        .insert(info.id.clone(), options.send_queue_capacity);
    if let Err(e) = core.store.add(record_of(inner, info)).await {
        error!(connection = %info.id, user = %info.user, error = %e, "could not record the connection");
        let reason = "The connection store is unavailable; try again later.";
        let _ = socket
            .send(Message::Text(Utf8Bytes::from_static(
                protocol::HANDSHAKE_OK,
            )))
            .await;
        let _ = socket
            .send(Message::Text(protocol::close(Some(reason), true).into()))
            .await;
        close_socket(&mut socket).await;
        return Err(End::Closed(reason.to_owned()));
    }
    *connected = true;
    if !core.capabilities.lookup {
        core.registry.join(&info.id, &user_group(&info.user));
    }
    let ctx = HubContext::new(core.clone(), info.user.clone(), info.id.clone());
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
    };
    Ok((session, reader, early))
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
            Some(Ok(Message::Binary(_))) => {
                return Err(HandshakeEnd::Protocol(ProtocolError::Handshake(
                    "the handshake must be sent in a text frame".into(),
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

fn not_reading(limit: Duration) -> End {
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

/// Bookkeeping of stateful reconnect.
struct Stateful {
    reattach: Reattach,
    /// Number of the last trackable record sent.
    sent: u64,
    /// Sent trackable records the client has not acknowledged, oldest first.
    unacked: VecDeque<(u64, Utf8Bytes)>,
    unacked_bytes: usize,
    /// Highest number of a trackable record received and processed.
    received: u64,
    /// Number of the last trackable record seen on the current transport.
    incoming: u64,
    /// When to acknowledge what was received.
    ack_due: Option<Instant>,
}

impl Stateful {
    fn new(reattach: Reattach) -> Self {
        Self {
            reattach,
            sent: 0,
            unacked: VecDeque::new(),
            unacked_bytes: 0,
            received: 0,
            incoming: 0,
            ack_due: None,
        }
    }

    fn track(&mut self, text: &Utf8Bytes) {
        self.sent += 1;
        self.unacked_bytes += text.len();
        self.unacked.push_back((self.sent, text.clone()));
    }

    fn acknowledge(&mut self, upto: u64) {
        while self.unacked.front().is_some_and(|(seq, _)| *seq <= upto) {
            if let Some((_, text)) = self.unacked.pop_front() {
                self.unacked_bytes -= text.len();
            }
        }
    }

    /// Counts one received trackable record; `false` when it is a re-sent duplicate.
    fn receive(&mut self) -> bool {
        self.incoming += 1;
        if self.incoming <= self.received {
            return false;
        }
        self.received = self.incoming;
        if self.ack_due.is_none() {
            self.ack_due = Some(Instant::now() + ACK_DELAY);
        }
        true
    }
}

/// The per-connection state of the message loop.
struct Session<'a> {
    inner: &'a Inner,
    info: &'a ConnectionInfo,
    socket: WebSocket,
    mailbox: Arc<Mailbox>,
    /// Reused buffer for records taken from the mailbox.
    batch: Vec<Utf8Bytes>,
    last_write: Instant,
    last_read: Instant,
    stateful: Option<Stateful>,
}

impl Session<'_> {
    /// Whether the replay buffer has room for more records (always, without stateful
    /// reconnect). When it is full, queued records wait for the client's Acks.
    fn can_send(&self) -> bool {
        self.stateful
            .as_ref()
            .is_none_or(|s| s.unacked_bytes < self.inner.options.reconnect_buffer_size)
    }

    /// Serves the current transport until it, or the connection, ends.
    async fn transport_loop(&mut self, reader: &mut RecordReader) -> End {
        let options = &self.inner.options;
        let mut shutdown = self.inner.shutdown.subscribe();
        let mailbox = self.mailbox.clone();
        let timer = sleep_until(self.next_deadline());
        tokio::pin!(timer);
        loop {
            let can_send = self.can_send();
            let step: Result<(), End> = tokio::select! {
                biased;
                Ok(()) = shutdown.changed() => {
                    Err(End::Closed("the server is shutting down".into()))
                }
                event = mailbox.ready(), if can_send => match event {
                    MailboxEvent::Ready => self.write_batch().await,
                    MailboxEvent::Overflowed => Err(End::Unresponsive(format!(
                        "The client is not reading its messages: {} records are waiting.",
                        options.send_queue_capacity
                    ))),
                },
                frame = self.socket.recv() => self.on_frame(frame, reader).await,
                () = &mut timer => Box::pin(self.on_timer()).await,
                Some(socket) = recv_reattach(&mut self.stateful) => {
                    // The client re-attached before we noticed the old transport died.
                    *reader = RecordReader::default();
                    Box::pin(self.resume(socket)).await
                }
            };
            if let Err(end) = step {
                return end;
            }
            // Deadlines only move later as traffic flows, except when an Ack becomes due:
            // touch the timer only when it fired or must fire sooner.
            let next = self.next_deadline();
            if timer.is_elapsed() || next < timer.deadline() {
                timer.as_mut().reset(next);
            }
        }
    }

    async fn on_frame(
        &mut self,
        frame: Option<Result<Message, axum::Error>>,
        reader: &mut RecordReader,
    ) -> Result<(), End> {
        let frame = match frame {
            None | Some(Ok(Message::Close(_))) => return Err(End::TransportLost(None)),
            Some(Err(e)) => return Err(End::TransportLost(Some(e))),
            Some(Ok(Message::Text(text))) => Bytes::from(text),
            Some(Ok(Message::Binary(_))) => {
                return Err(End::Closed(ProtocolError::BinaryFrame.to_string()));
            }
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => return Ok(()),
        };
        self.last_read = Instant::now();
        let whole = reader
            .complete(frame, self.inner.options.max_record_size)
            .map_err(|e| End::Closed(e.to_string()))?;
        // Boxed: keeps the per-connection future small while the connection idles.
        Box::pin(self.handle_records(&whole)).await
    }

    async fn on_timer(&mut self) -> Result<(), End> {
        let options = &self.inner.options;
        let now = Instant::now();
        if now.duration_since(self.last_read) >= options.client_timeout {
            return Err(End::Closed(format!(
                "Client timeout: nothing was received for {:?}.",
                options.client_timeout
            )));
        }
        if let Some(stateful) = &mut self.stateful
            && stateful.ack_due.is_some_and(|due| due <= now)
        {
            stateful.ack_due = None;
            let ack = protocol::sequence_message(kind::ACK, stateful.received);
            self.write_raw(ack.into()).await?;
            self.flush().await?;
        }
        if now.duration_since(self.last_write) >= options.keep_alive_interval {
            self.write_raw(Utf8Bytes::from_static(protocol::PING))
                .await?;
            self.flush().await?;
        }
        Ok(())
    }

    fn next_deadline(&self) -> Instant {
        let options = &self.inner.options;
        let mut deadline = (self.last_write + options.keep_alive_interval)
            .min(self.last_read + options.client_timeout);
        if let Some(due) = self.stateful.as_ref().and_then(|s| s.ack_due) {
            deadline = deadline.min(due);
        }
        deadline
    }

    /// Keeps the connection alive without a transport until the client re-attaches, the
    /// window closes, or the server shuts down. Messages for the client keep being numbered
    /// and buffered for the replay.
    async fn wait_for_reattach(&mut self) -> Result<WebSocket, End> {
        let window = self.inner.options.reconnect_window;
        let deadline = Instant::now() + window;
        let mut shutdown = self.inner.shutdown.subscribe();
        let mailbox = self.mailbox.clone();
        loop {
            let can_send = self.can_send();
            let Some(stateful) = self.stateful.as_mut() else {
                return Err(End::TransportLost(None));
            };
            tokio::select! {
                biased;
                Ok(()) = shutdown.changed() => return Err(End::TransportLost(None)),
                socket = stateful.reattach.recv() => {
                    return socket.ok_or(End::TransportLost(None));
                }
                event = mailbox.ready(), if can_send => match event {
                    MailboxEvent::Ready => {
                        // Numbered and kept for the replay, like records that were sent.
                        if let Some(text) = mailbox.pop() {
                            stateful.track(&text);
                        }
                    }
                    MailboxEvent::Overflowed => {
                        return Err(End::Unresponsive(
                            "The client's messages overflowed while it was reconnecting.".into(),
                        ));
                    }
                },
                () = sleep_until(deadline) => {
                    return Err(End::Unresponsive(format!(
                        "The client did not reconnect within {window:?}."
                    )));
                }
            }
        }
    }

    /// Takes over a new transport: Sequence, replay of unacknowledged records, the store
    /// record and `on_reconnected`.
    async fn resume(&mut self, socket: WebSocket) -> Result<(), End> {
        let old = std::mem::replace(&mut self.socket, socket);
        drop(old);
        let Some(stateful) = self.stateful.as_mut() else {
            return Err(End::TransportLost(None));
        };
        debug!(
            unacked = stateful.unacked.len(),
            "client re-attached; replaying"
        );
        stateful.incoming = stateful.received;
        stateful.ack_due = None;
        let first = stateful
            .unacked
            .front()
            .map_or(stateful.sent + 1, |(seq, _)| *seq);
        let replay: Vec<Utf8Bytes> = stateful.unacked.iter().map(|(_, t)| t.clone()).collect();
        self.write_raw(protocol::sequence_message(kind::SEQUENCE, first).into())
            .await?;
        for text in replay {
            self.write_raw(text).await?;
        }
        self.flush().await?;
        self.last_read = Instant::now();

        let inner = self.inner;
        if let Err(e) = inner
            .core
            .store
            .reconnect(record_of(inner, self.info))
            .await
        {
            error!(
                connection = %self.info.id,
                user = %self.info.user,
                error = %e,
                "could not record the re-attached connection"
            );
        }
        let ctx = HubContext::new(
            inner.core.clone(),
            self.info.user.clone(),
            self.info.id.clone(),
        );
        if let Some(hook) = inner.hub.reconnected_hook(ctx) {
            hook.await;
        }
        Ok(())
    }

    /// Sends the closing messages that fit how the session ended.
    async fn finish(mut self, end: End) -> End {
        if let End::Closed(reason) = &end {
            let message = if self.inner.shutting_down() {
                protocol::close(None, true)
            } else {
                protocol::close(Some(reason), false)
            };
            let _ = self.drain_queue().await;
            let _ = self.write_raw(message.into()).await;
            let _ = self.flush().await;
            let _ = timeout(
                self.inner.options.client_timeout,
                close_socket(&mut self.socket),
            )
            .await;
        }
        end
    }

    /// Queues a frame on the socket. A client that stops reading cannot block the session
    /// longer than the client timeout.
    async fn write_raw(&mut self, text: Utf8Bytes) -> Result<(), End> {
        let limit = self.inner.options.client_timeout;
        match timeout(limit, self.socket.feed(Message::Text(text))).await {
            Ok(result) => result.map_err(|e| End::TransportLost(Some(e))),
            Err(_) => Err(not_reading(limit)),
        }
    }

    /// Queues a trackable record (an invocation or a completion).
    async fn write_tracked(&mut self, text: Utf8Bytes) -> Result<(), End> {
        if let Some(stateful) = &mut self.stateful {
            stateful.track(&text);
        }
        self.write_raw(text).await
    }

    async fn flush(&mut self) -> Result<(), End> {
        let limit = self.inner.options.client_timeout;
        let result = match timeout(limit, self.socket.flush()).await {
            Ok(result) => result.map_err(|e| End::TransportLost(Some(e))),
            Err(_) => Err(not_reading(limit)),
        };
        self.last_write = Instant::now();
        result
    }

    /// Writes what is queued (up to a batch, as far as the replay buffer allows), then
    /// flushes once.
    async fn write_batch(&mut self) -> Result<(), End> {
        let mut batch = std::mem::take(&mut self.batch);
        self.mailbox.take(&mut batch, WRITE_BATCH);
        let mut result = Ok(());
        for text in batch.drain(..) {
            if result.is_ok() {
                result = self.write_tracked(text).await;
            }
        }
        self.batch = batch;
        result?;
        self.flush().await
    }

    /// Writes everything queued so far (keeps sends of a method ahead of its Completion).
    async fn drain_queue(&mut self) -> Result<(), End> {
        while let Some(text) = self.mailbox.pop() {
            self.write_tracked(text).await?;
        }
        Ok(())
    }

    async fn handle_records(&mut self, whole: &Bytes) -> Result<(), End> {
        let max = self.inner.options.max_record_size;
        for record in protocol::records(whole) {
            protocol::check_size(record, max).map_err(|e| End::Closed(e.to_string()))?;
            let message =
                protocol::parse_message(record).map_err(|e| End::Closed(e.to_string()))?;
            if is_trackable(&message)
                && let Some(stateful) = &mut self.stateful
                && !stateful.receive()
            {
                continue; // re-sent after a re-attach, already processed
            }
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
                ClientMessage::Ack(upto) => {
                    if let Some(stateful) = &mut self.stateful {
                        stateful.acknowledge(upto);
                    }
                }
                ClientMessage::Sequence(first) => {
                    if let Some(stateful) = &mut self.stateful {
                        if first > stateful.received + 1 {
                            return Err(End::Closed(
                                "Sequence ID greater than amount of messages we've received."
                                    .into(),
                            ));
                        }
                        stateful.incoming = first.saturating_sub(1);
                    }
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
        self.write_tracked(completion.into()).await?;
        self.flush().await
    }
}

/// The next re-attaching transport, or never (without stateful reconnect).
async fn recv_reattach(stateful: &mut Option<Stateful>) -> Option<WebSocket> {
    match stateful {
        Some(stateful) => stateful.reattach.recv().await,
        None => std::future::pending().await,
    }
}

/// Records that count for stateful reconnect: invocations, stream items, completions, stream
/// invocations and cancellations.
fn is_trackable(message: &ClientMessage<'_>) -> bool {
    match message {
        ClientMessage::Invocation { .. } | ClientMessage::StreamInvocation { .. } => true,
        ClientMessage::Ignored(kind) => matches!(
            *kind,
            kind::STREAM_ITEM | kind::COMPLETION | kind::CANCEL_INVOCATION
        ),
        ClientMessage::Ping
        | ClientMessage::Close
        | ClientMessage::Ack(_)
        | ClientMessage::Sequence(_) => false,
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
            warn!(connection = %info.id, user = %info.user, method = target, error = %e, "hub method failed");
            Err(e.client_message(target))
        }
        Err(_) => {
            error!(connection = %info.id, user = %info.user, method = target, "hub method panicked");
            Err(format!(
                "An unexpected error occurred invoking '{target}' on the server."
            ))
        }
    }
}
