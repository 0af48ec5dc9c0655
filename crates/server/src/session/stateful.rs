//! Stateful reconnect.
//!
//! When a client negotiated stateful reconnect and handshook with version 2, the session
//! numbers every trackable record it sends (invocations and completions), keeps them until the
//! client acknowledges them, and counts the trackable records it receives. If the socket drops
//! without a Close message, the connection stays alive — in the local registry and in the
//! store — for [`HubOptions::reconnect_window`](crate::HubOptions::reconnect_window), collecting
//! messages for the client. A new WebSocket presenting the same connection token (and a token
//! for the same user) takes over: the session sends a Sequence message and replays every
//! unacknowledged record, suppresses records the client re-sends that it already processed,
//! re-records the connection in the store and runs `on_reconnected`. Calls still running when
//! the transport dropped wait for the new transport.

use std::collections::VecDeque;
use std::time::Duration;

use axum::extract::ws::{Utf8Bytes, WebSocket};
use tokio::time::{Instant, sleep_until};
use tracing::{debug, error};

use super::open::record_of;
use super::{End, Reattach, STORE_FAILED, Session};
use crate::hub::HubContext;
use crate::mailbox::MailboxEvent;
use crate::protocol::{self, ClientMessage, kind};

/// How long after receiving trackable records an Ack is sent.
const ACK_DELAY: Duration = Duration::from_secs(1);

/// Bookkeeping of stateful reconnect.
pub(super) struct Stateful {
    pub(super) reattach: Reattach,
    /// Number of the last trackable record sent.
    sent: u64,
    /// Sent trackable records the client has not acknowledged, oldest first.
    unacked: VecDeque<(u64, Utf8Bytes)>,
    pub(super) unacked_bytes: usize,
    /// Highest number of a trackable record received and processed.
    pub(super) received: u64,
    /// Number of the last trackable record seen on the current transport.
    pub(super) incoming: u64,
    /// When to acknowledge what was received.
    pub(super) ack_due: Option<Instant>,
}

impl Stateful {
    pub(super) fn new(reattach: Reattach) -> Self {
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

    pub(super) fn track(&mut self, text: &Utf8Bytes) {
        self.sent += 1;
        self.unacked_bytes += text.len();
        self.unacked.push_back((self.sent, text.clone()));
    }

    pub(super) fn acknowledge(&mut self, upto: u64) {
        while self.unacked.front().is_some_and(|(seq, _)| *seq <= upto) {
            if let Some((_, text)) = self.unacked.pop_front() {
                self.unacked_bytes -= text.len();
            }
        }
    }

    /// Counts one received trackable record; `false` when it is a re-sent duplicate.
    pub(super) fn receive(&mut self) -> bool {
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

/// The next re-attaching transport, or never (without stateful reconnect).
pub(super) async fn recv_reattach(stateful: &mut Option<Stateful>) -> Option<WebSocket> {
    match stateful {
        Some(stateful) => stateful.reattach.recv().await,
        None => std::future::pending().await,
    }
}

/// Records that count for stateful reconnect: invocations, stream items, completions, stream
/// invocations and cancellations.
pub(super) fn is_trackable(message: &ClientMessage<'_>) -> bool {
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

impl Session<'_> {
    /// Keeps the connection alive without a transport until the client re-attaches, the
    /// window closes, or the server shuts down. Messages for the client keep being numbered
    /// and buffered for the replay.
    pub(super) async fn wait_for_reattach(&mut self) -> Result<WebSocket, End> {
        let window = self.inner.options.reconnect_window;
        let deadline = Instant::now() + window;
        let mut shutdown = self.inner.shutdown.subscribe();
        if self.inner.shutting_down() {
            return Err(End::TransportLost(None));
        }
        let mailbox = self.mailbox.clone();
        let overflowed = || {
            End::Unresponsive("The client's messages overflowed while it was reconnecting.".into())
        };
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
                event = mailbox.event(can_send) => match event {
                    MailboxEvent::Ready => {
                        // Numbered and kept for the replay, like records that were sent.
                        if let Some(text) = mailbox.pop() {
                            stateful.track(&text);
                        }
                    }
                    MailboxEvent::Closing(_) => return Err(overflowed()),
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
    pub(super) async fn resume(&mut self, socket: WebSocket) -> Result<(), End> {
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
        let record = record_of(inner, self.info);
        inner.router.registry.set_record(&record);
        if let Err(e) = inner.router.store.reconnect(record).await {
            if let Some(suppressed) = STORE_FAILED.allow() {
                error!(
                    connection = %self.info.id,
                    user = %self.info.user,
                    error = %e,
                    suppressed,
                    "could not record the re-attached connection; retrying in the background"
                );
            }
            inner.maintenance.rerecord_later();
        }
        let ctx = HubContext::new(
            inner.router.clone(),
            self.info.user.clone(),
            self.info.id.clone(),
        );
        if let Some(hook) = inner.hub.reconnected_hook(ctx) {
            hook.await;
        }
        Ok(())
    }
}
