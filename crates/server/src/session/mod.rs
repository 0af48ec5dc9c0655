//! One connection's life: handshake, message loop, keep-alive, flow control, stateful
//! reconnect, and the cleanup that runs on every exit path.
//!
//! | file | what |
//! |---|---|
//! | `mod.rs` | the session task: the message loop, writes, Close messages, cleanup |
//! | `open.rs` | handshake, registration in the registry and the store (**record on open**), `on_connected` |
//! | `close.rs` | `on_disconnected`, leaving the registry and the store (**remove on close**), on every exit path |
//! | `calls.rs` | hub method calls: the rate limit, calls in flight, Completions |
//! | `stateful.rs` | stateful reconnect: numbering, replay, re-attaching transports (**re-record on re-attach**) |
//!
//! # Flow control
//!
//! A client cannot make the server do more than it can keep up with, and cannot harm other
//! clients:
//!
//! * Records are read from the socket only while the connection has room for another call
//!   ([`HubOptions::max_parallel_invocations`](crate::HubOptions::max_parallel_invocations))
//!   and within its rate ([`HubOptions::max_invocations_per_second`]
//!   (crate::HubOptions::max_invocations_per_second)); otherwise the session stops reading
//!   and TCP slows the client down. Nothing is refused or dropped.
//! * A hub method that sends to a full queue waits for room (see [`crate::mailbox`]), so a
//!   sender is slowed down to the speed of its recipients. While its calls run, the session
//!   keeps writing its own queue and answering keep-alives.
//! * A connection that does not read its messages is closed: promptly (when a sender had to
//!   wait [`HubOptions::send_timeout`](crate::HubOptions::send_timeout) for room), and in any
//!   case when one socket write blocks for the client timeout.

mod calls;
mod close;
mod open;
mod stateful;

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use bytes::Bytes;
use futures_util::{FutureExt, SinkExt};
use switchboard_core::{ConnectionId, UserId};
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep_until, timeout};
use tracing::{Instrument, debug, debug_span, error, warn};

use crate::mailbox::{Closing, Mailbox, MailboxEvent};
use crate::protocol::{self, ClientMessage, ProtocolError, RecordReader, kind};
use crate::state::Shared;
use crate::throttle::Throttle;

pub(crate) use self::open::too_many_connections;

use self::calls::Calls;
use self::stateful::{Stateful, is_trackable, recv_reattach};

/// Log lines about dropped, unresponsive clients.
static UNRESPONSIVE: Throttle = Throttle::new(10, Duration::from_secs(10));
/// Log lines about sessions that panicked.
pub(crate) static PANICKED: Throttle = Throttle::new(10, Duration::from_secs(10));
/// Log lines about store failures on connect, reconnect and disconnect.
pub(crate) static STORE_FAILED: Throttle = Throttle::new(10, Duration::from_secs(10));

/// Who is behind a connection that is about to start.
#[derive(Debug)]
pub(crate) struct ConnectionInfo {
    pub(crate) id: ConnectionId,
    pub(crate) token: Option<Arc<str>>,
    pub(crate) user: UserId,
    /// Already cut to [`ConnectionRecord::MAX_USER_AGENT`](switchboard_core::ConnectionRecord::MAX_USER_AGENT).
    pub(crate) user_agent: Option<Arc<str>>,
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
    /// We close it with a Close message carrying `reason`, after writing what is queued.
    Closed {
        /// The error the client sees.
        reason: String,
        /// Whether the client may reconnect.
        reconnect: bool,
    },
    /// The client stopped reading: it is dropped (a Close message is only attempted briefly,
    /// as it would not be read).
    Unresponsive(String),
}

impl End {
    /// Closed for a reason that reconnecting does not fix (a protocol violation).
    fn closed(reason: impl Into<String>) -> Self {
        Self::Closed {
            reason: reason.into(),
            reconnect: false,
        }
    }

    fn protocol(error: ProtocolError) -> Self {
        Self::closed(error.to_string())
    }
}

/// Most queued records written per flush.
const WRITE_BATCH: usize = 64;

/// How long a Close message to a client that stopped reading may take.
const UNRESPONSIVE_CLOSE: Duration = Duration::from_secs(1);

/// Runs a connection to the end and always cleans up: removes it from the local registry and
/// from the store, runs `on_disconnected` if `on_connected` ran, and releases its token.
pub(crate) async fn run(
    inner: Arc<Shared>,
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
            Ok(End::Closed { reason, .. }) => debug!(%reason, "server closed the connection"),
            Ok(End::Unresponsive(reason)) => {
                if let Some(suppressed) = UNRESPONSIVE.allow() {
                    warn!(
                        connection = %info.id,
                        user = %info.user,
                        %reason,
                        suppressed,
                        "dropped an unresponsive client"
                    );
                }
            }
            Err(_) => {
                if let Some(suppressed) = PANICKED.allow() {
                    error!(
                        connection = %info.id,
                        user = %info.user,
                        suppressed,
                        "the connection task panicked; cleaning up"
                    );
                }
            }
        }
        close::cleanup(&inner, &info, connected).await;
    }
    .instrument(span)
    .await;
}

async fn serve(
    inner: &Shared,
    socket: WebSocket,
    info: &ConnectionInfo,
    reattach: Option<Reattach>,
    connected: &mut bool,
) -> End {
    // Boxed: the set-up's locals are freed once it is done, so a live connection's future
    // holds only the session.
    let (mut session, mut reader, early) =
        match Box::pin(open::open(inner, socket, info, reattach, connected)).await {
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

async fn close_socket(socket: &mut WebSocket) {
    let _ = socket
        .send(Message::Close(Some(CloseFrame {
            code: 1000,
            reason: Utf8Bytes::from_static(""),
        })))
        .await;
}

/// The per-connection state of the message loop.
struct Session<'a> {
    inner: &'a Shared,
    info: &'a ConnectionInfo,
    socket: WebSocket,
    mailbox: Arc<Mailbox>,
    /// Reused buffer for records taken from the mailbox.
    batch: Vec<Utf8Bytes>,
    last_write: Instant,
    last_read: Instant,
    stateful: Option<Stateful>,
    calls: Calls,
}

/// What [`Session::serve_until`] waits for.
#[derive(Debug, Clone, Copy)]
enum Until {
    /// A point in time.
    Time(Instant),
    /// One running call completed.
    CallDone,
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
        let mut shutdown = self.inner.shutdown.subscribe();
        if self.inner.shutting_down() {
            return End::closed("the server is shutting down");
        }
        let mailbox = self.mailbox.clone();
        let timer = sleep_until(self.next_deadline());
        tokio::pin!(timer);
        loop {
            let can_send = self.can_send();
            let busy = self.calls.busy();
            let reading = self.calls.has_room();
            let step: Result<(), End> = tokio::select! {
                biased;
                Ok(()) = shutdown.changed() => Err(End::closed("the server is shutting down")),
                event = mailbox.event(can_send) => self.on_mailbox(event).await,
                Some(done) = self.calls.next(), if busy => Box::pin(self.complete(done)).await,
                frame = self.socket.recv(), if reading => self.on_frame(frame, reader).await,
                () = &mut timer => Box::pin(self.on_timer(reading)).await,
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

    /// Serves the mailbox, running calls and timers — but reads nothing from the socket —
    /// until `until`: how a connection's records are held back while it waits for its rate
    /// or for a call to complete.
    async fn serve_until(&mut self, until: Until) -> Result<(), End> {
        if self.inner.shutting_down() {
            return Err(End::closed("the server is shutting down"));
        }
        let mut shutdown = self.inner.shutdown.subscribe();
        let mailbox = self.mailbox.clone();
        loop {
            let can_send = self.can_send();
            let busy = self.calls.busy();
            let deadline = match until {
                Until::Time(at) => self.next_deadline().min(at),
                Until::CallDone => self.next_deadline(),
            };
            tokio::select! {
                biased;
                Ok(()) = shutdown.changed() => {
                    return Err(End::closed("the server is shutting down"));
                }
                event = mailbox.event(can_send) => self.on_mailbox(event).await?,
                Some(done) = self.calls.next(), if busy => {
                    Box::pin(self.complete(done)).await?;
                    if matches!(until, Until::CallDone) {
                        return Ok(());
                    }
                }
                () = sleep_until(deadline) => {
                    if let Until::Time(at) = until
                        && Instant::now() >= at
                    {
                        return Ok(());
                    }
                    Box::pin(self.on_timer(false)).await?;
                }
            }
        }
    }

    /// Acts on what the mailbox reports.
    async fn on_mailbox(&mut self, event: MailboxEvent) -> Result<(), End> {
        match event {
            MailboxEvent::Ready => self.write_batch().await,
            // Reported once everything queued was written.
            MailboxEvent::Closing(Closing::Lagging) => Err(End::Closed {
                reason: format!(
                    "The client did not keep up with its messages: its queue stayed full for {:?}.",
                    self.inner.options.send_timeout
                ),
                reconnect: true,
            }),
            MailboxEvent::Closing(Closing::Stalled) => Err(self.stalled()),
            MailboxEvent::Closing(Closing::Gone) => {
                Err(End::closed("The connection was closed by the server."))
            }
        }
    }

    fn stalled(&self) -> End {
        stalled(self.inner.options.send_timeout)
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
                return Err(End::protocol(ProtocolError::BinaryFrame));
            }
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => return Ok(()),
        };
        self.last_read = Instant::now();
        let whole = reader
            .complete(frame, self.inner.options.max_record_size)
            .map_err(End::protocol)?;
        // Boxed: keeps the per-connection future small while the connection idles.
        Box::pin(self.handle_records(&whole)).await?;
        // Time spent on the client's records is not the client's silence.
        self.last_read = Instant::now();
        Ok(())
    }

    /// Keep-alive, Acks and the client timeout. `reading` says whether the session reads the
    /// socket right now: while it holds the client's records back itself (rate, calls in
    /// flight), the client's silence is not the client's fault and the timeout is paused.
    async fn on_timer(&mut self, reading: bool) -> Result<(), End> {
        let options = &self.inner.options;
        let now = Instant::now();
        if !reading {
            self.last_read = now;
        }
        if now.duration_since(self.last_read) >= options.client_timeout {
            return Err(End::closed(format!(
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

    /// Sends the closing messages that fit how the session ended.
    async fn finish(mut self, end: End) -> End {
        match &end {
            End::Closed { reason, reconnect } => {
                let message = if self.inner.shutting_down() {
                    protocol::close(None, true)
                } else {
                    protocol::close(Some(reason), *reconnect)
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
            End::Unresponsive(reason) => {
                // The client does not read, so this most likely never arrives; try briefly.
                let message = Message::Text(protocol::close(Some(reason), true).into());
                let _ = timeout(UNRESPONSIVE_CLOSE, self.socket.send(message)).await;
            }
            End::ClientClosed | End::TransportLost(_) => {}
        }
        end
    }

    /// How long one socket write may block: the client timeout, or the send timeout once the
    /// connection is being closed for lagging behind.
    fn write_limit(&self) -> Duration {
        let options = &self.inner.options;
        match self.mailbox.closing() {
            Some(Closing::Lagging) => options.client_timeout.min(options.send_timeout),
            _ => options.client_timeout,
        }
    }

    /// Queues a frame on the socket. A client that stops reading cannot block the session
    /// longer than the write limit, and not at all once its mailbox is stalled.
    async fn write_raw(&mut self, text: Utf8Bytes) -> Result<(), End> {
        let limit = self.write_limit();
        let send_timeout = self.inner.options.send_timeout;
        let mut write = self.socket.feed(Message::Text(text));
        // Most writes finish at once: no clock reading, no timer, and the waiting below lives
        // in its own allocation, so an idle connection's task does not carry it.
        if let Poll::Ready(result) = poll_once(&mut write).await {
            return result.map_err(|e| End::TransportLost(Some(e)));
        }
        Box::pin(blocked(&self.mailbox, write, limit, send_timeout)).await
    }

    /// Queues a trackable record (an invocation or a completion).
    async fn write_tracked(&mut self, text: Utf8Bytes) -> Result<(), End> {
        if let Some(stateful) = &mut self.stateful {
            stateful.track(&text);
        }
        self.write_raw(text).await
    }

    async fn flush(&mut self) -> Result<(), End> {
        let limit = self.write_limit();
        let send_timeout = self.inner.options.send_timeout;
        let mut flush = self.socket.flush();
        let result = match poll_once(&mut flush).await {
            Poll::Ready(result) => result.map_err(|e| End::TransportLost(Some(e))),
            Poll::Pending => Box::pin(blocked(&self.mailbox, flush, limit, send_timeout)).await,
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
            protocol::check_size(record, max).map_err(End::protocol)?;
            let message = protocol::parse_message(record).map_err(End::protocol)?;
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
                    if has_streams {
                        let reply = Err("Client-to-server streaming is not supported.".to_owned());
                        self.reply(invocation_id.as_deref(), &target, reply).await?;
                        continue;
                    }
                    self.admit_call().await?;
                    match calls::start(self.inner, self.info, invocation_id, &target, arguments) {
                        Ok(call) => self.run_call(call).await?,
                        Err((id, reply)) => self.reply(id.as_deref(), &target, Err(reply)).await?,
                    }
                }
                ClientMessage::StreamInvocation {
                    invocation_id,
                    target,
                } => {
                    let reply = Err(format!(
                        "Failed to invoke '{target}': streaming hub methods are not supported."
                    ));
                    self.reply(Some(&invocation_id), &target, reply).await?;
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
                            return Err(End::closed(
                                "Sequence ID greater than amount of messages we've received.",
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
    async fn reply(
        &mut self,
        invocation_id: Option<&str>,
        target: &str,
        reply: Result<Box<serde_json::value::RawValue>, String>,
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

/// Waits for a socket write: at most `limit`; not at all once the mailbox is stalled; and once
/// it was blocked for `send_timeout` while a sender waits for room, the client is not reading
/// and the mailbox is declared stalled.
async fn blocked(
    mailbox: &Mailbox,
    write: impl Future<Output = Result<(), axum::Error>>,
    limit: Duration,
    send_timeout: Duration,
) -> Result<(), End> {
    tokio::pin!(write);
    let deadline = Instant::now() + limit;
    loop {
        tokio::select! {
            biased;
            result = &mut write => return result.map_err(|e| End::TransportLost(Some(e))),
            () = mailbox.stalled() => return Err(stalled(send_timeout)),
            () = sleep_until(deadline.min(Instant::now() + send_timeout)) => {
                if mailbox.stall_if_awaited() {
                    return Err(stalled(send_timeout));
                }
                if Instant::now() >= deadline {
                    return Err(not_reading(limit));
                }
            }
        }
    }
}

/// Polls a future once, in the calling task.
async fn poll_once<F: Future + Unpin>(future: &mut F) -> Poll<F::Output> {
    std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut *future).poll(cx))).await
}

fn stalled(send_timeout: Duration) -> End {
    End::Unresponsive(format!(
        "The client stopped reading its messages: its queue stayed full for {send_timeout:?}."
    ))
}

fn not_reading(limit: Duration) -> End {
    End::Unresponsive(format!(
        "The client did not read its messages for {limit:?}."
    ))
}
