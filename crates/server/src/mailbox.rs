//! The outgoing queue of one local connection, and the flow control between the senders that
//! fill it and the session that empties it.
//!
//! # Flow control
//!
//! A mailbox holds at most [`HubOptions::send_queue_size`](crate::HubOptions::send_queue_size)
//! bytes of records (each record also costs [`RECORD_OVERHEAD`] bytes, so a flood of tiny
//! records is bounded too). Senders never lose a record silently and never close a connection
//! that keeps up:
//!
//! * When there is room, a send queues the record at once and never waits.
//! * When the queue is full, the sender waits for room, fairly (first come, first served), for
//!   at most [`HubOptions::send_timeout`](crate::HubOptions::send_timeout). The sender is slowed
//!   down; its target is not harmed. A reader that keeps reading frees room as fast as its
//!   socket drains, so a flood from any number of senders only ever slows the senders down.
//! * When a sender waited the whole timeout, the recipient is not keeping up and is closed:
//!   the sender is told the message could not be delivered because the recipient is not
//!   reading ([`Sent::NotReading`]), and the recipient's session is told how it ended:
//!   - [`Closing::Lagging`]: the session took records during the wait (the client reads, but
//!     more slowly than it is sent to). It writes what the queue holds, then a Close message
//!     that allows the client to reconnect.
//!   - [`Closing::Stalled`]: the session took nothing during the wait (its socket is blocked:
//!     the client stopped reading). A write that is blocked on the socket gives up at once, so
//!     the connection is dropped promptly instead of after the client timeout. A session whose
//!     socket write stays blocked for the send timeout while a sender waits declares itself
//!     stalled too: the waiting sender may be one of its own calls, which cannot run while the
//!     session is blocked.
//!
//! Later sends to a closing mailbox fail at once with [`Sent::NotReading`]; after the session
//! ended ([`Closing::Gone`]) with [`Sent::Gone`].

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use axum::extract::ws::Utf8Bytes;
use tokio::sync::{Notify, Semaphore, TryAcquireError};

/// Bytes every queued record costs on top of its length: the queue slot and the shared
/// buffer's bookkeeping. Bounds the number of tiny records a queue can hold.
pub(crate) const RECORD_OVERHEAD: usize = 64;

/// Largest queue size in bytes (the semaphore counts permits in `u32`).
const MAX_QUEUE_SIZE: usize = u32::MAX as usize / 2;

/// What happened to one send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Sent {
    /// Queued for the socket.
    Queued,
    /// No such local connection: it ended (or never existed).
    Gone,
    /// The connection is being closed because it does not read its messages fast enough; the
    /// record was not queued.
    NotReading,
}

/// Why a mailbox stopped taking records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Closing {
    /// The client reads, but too slowly: deliver what the queue holds, then close.
    Lagging,
    /// The client does not read at all: drop the connection now.
    Stalled,
    /// The session ended.
    Gone,
}

/// What the session should do next with its mailbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MailboxEvent {
    /// Records are waiting.
    Ready,
    /// No more records will come; the queue is empty (or, when stalled, abandoned).
    Closing(Closing),
}

const OPEN: u8 = 0;
const LAGGING: u8 = 1;
const STALLED: u8 = 2;
const GONE: u8 = 3;

/// Outcome of a send that did not wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Offer {
    /// The record is queued, or the send failed for good.
    Done(Sent),
    /// The queue is full: wait for room with [`Mailbox::push_waiting`].
    Full,
}

/// The outgoing queue of one local connection: whole serialized records, shared between all
/// recipients of a fan-out, waiting for the connection's session to write them.
///
/// Lean on purpose (it exists once per connection): an idle mailbox holds no buffer, senders
/// do not wait while there is room, and the session takes a whole batch under one lock.
#[derive(Debug)]
pub(crate) struct Mailbox {
    queue: Mutex<VecDeque<Utf8Bytes>>,
    /// Free room in bytes. Closed once the mailbox is closing, which wakes every waiting sender.
    room: Semaphore,
    /// Size of the queue in bytes (the semaphore's permits when empty).
    capacity: usize,
    /// Wakes the session: records arrived, or the mailbox is closing. The session waits for
    /// one thing at a time (records, or a stall while a write blocks), so one `Notify` serves
    /// both; a wake-up for the other is harmless, as every wait re-checks its condition.
    signal: Notify,
    /// One of `OPEN`, `LAGGING`, `STALLED`, `GONE`.
    state: AtomicU8,
    /// Senders waiting for room right now.
    waiting: AtomicU32,
    /// Records the session has taken so far: progress, as senders see it.
    taken: AtomicU64,
}

impl Mailbox {
    /// A mailbox holding at most `capacity` bytes of records (at least one record always fits).
    pub(crate) fn new(capacity: usize) -> Self {
        let capacity = capacity.clamp(RECORD_OVERHEAD, MAX_QUEUE_SIZE);
        Self {
            queue: Mutex::new(VecDeque::new()),
            room: Semaphore::new(capacity),
            capacity,
            signal: Notify::new(),
            state: AtomicU8::new(OPEN),
            waiting: AtomicU32::new(0),
            taken: AtomicU64::new(0),
        }
    }

    fn queue(&self) -> MutexGuard<'_, VecDeque<Utf8Bytes>> {
        // The queue holds plain values; a panic elsewhere cannot leave it inconsistent.
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Room one record takes, in bytes (capped at the capacity, so any record fits an empty
    /// queue).
    fn cost(&self, record: &Utf8Bytes) -> u32 {
        let cost = record
            .len()
            .saturating_add(RECORD_OVERHEAD)
            .min(self.capacity);
        // `capacity` is at most MAX_QUEUE_SIZE, which fits in u32.
        u32::try_from(cost).unwrap_or(u32::MAX)
    }

    fn enqueue(&self, record: &Utf8Bytes) {
        self.queue().push_back(record.clone());
        self.signal.notify_one();
    }

    /// Queues a record if there is room, without waiting.
    pub(crate) fn offer(&self, record: &Utf8Bytes) -> Offer {
        match self.room.try_acquire_many(self.cost(record)) {
            Ok(permit) => {
                permit.forget();
                self.enqueue(record);
                Offer::Done(Sent::Queued)
            }
            Err(TryAcquireError::NoPermits) => Offer::Full,
            Err(TryAcquireError::Closed) => Offer::Done(self.closed_outcome()),
        }
    }

    /// Waits up to `wait` for room, then queues the record. When no room came in time the
    /// mailbox is closed ([`Closing::Lagging`] or [`Closing::Stalled`], see the module docs) and
    /// the answer is [`Sent::NotReading`]; `closed_here` tells whether this call closed it.
    pub(crate) async fn push_waiting(&self, record: &Utf8Bytes, wait: Duration) -> (Sent, bool) {
        let before = self.taken.load(Ordering::Acquire);
        self.waiting.fetch_add(1, Ordering::AcqRel);
        let acquired = tokio::time::timeout(wait, self.room.acquire_many(self.cost(record))).await;
        self.waiting.fetch_sub(1, Ordering::AcqRel);
        match acquired {
            Ok(Ok(permit)) => {
                permit.forget();
                self.enqueue(record);
                (Sent::Queued, false)
            }
            Ok(Err(_closed)) => (self.closed_outcome(), false),
            Err(_elapsed) => {
                let reason = if self.taken.load(Ordering::Acquire) == before {
                    Closing::Stalled
                } else {
                    Closing::Lagging
                };
                (Sent::NotReading, self.close(reason))
            }
        }
    }

    fn closed_outcome(&self) -> Sent {
        match self.state.load(Ordering::Acquire) {
            GONE => Sent::Gone,
            _ => Sent::NotReading,
        }
    }

    /// Stops taking records. Returns whether this call closed it (the first reason wins, except
    /// that `Gone` always ends a closing mailbox).
    pub(crate) fn close(&self, reason: Closing) -> bool {
        let new = match reason {
            Closing::Lagging => LAGGING,
            Closing::Stalled => STALLED,
            Closing::Gone => GONE,
        };
        let first = self
            .state
            .compare_exchange(OPEN, new, Ordering::AcqRel, Ordering::Acquire)
            .is_ok();
        if !first && new == GONE {
            self.state.store(GONE, Ordering::Release);
        }
        self.room.close();
        self.signal.notify_one();
        self.signal.notify_waiters();
        first
    }

    /// Called by a session whose socket write has been blocked for the send timeout: when a
    /// sender waits for room meanwhile, the client is not reading and the mailbox is stalled
    /// (the waiting sender may be the session's own call, which cannot notice while the
    /// session is blocked). Returns whether it is stalled now.
    pub(crate) fn stall_if_awaited(&self) -> bool {
        if self.waiting.load(Ordering::Acquire) > 0 {
            self.close(Closing::Stalled);
        }
        self.state.load(Ordering::Acquire) >= STALLED
    }

    /// Why the mailbox is closing, if it is.
    pub(crate) fn closing(&self) -> Option<Closing> {
        match self.state.load(Ordering::Acquire) {
            LAGGING => Some(Closing::Lagging),
            STALLED => Some(Closing::Stalled),
            GONE => Some(Closing::Gone),
            _ => None,
        }
    }

    /// What the session waits for in its loop: [`Mailbox::ready`] while it takes records
    /// (`taking`), else only a stall or the end (when the replay buffer of stateful reconnect
    /// waits for Acks). Cancel-safe.
    pub(crate) async fn event(&self, taking: bool) -> MailboxEvent {
        if taking {
            return self.ready().await;
        }
        self.stalled().await;
        match self.closing() {
            Some(Closing::Gone) => MailboxEvent::Closing(Closing::Gone),
            _ => MailboxEvent::Closing(Closing::Stalled),
        }
    }

    /// Waits until records are queued or the mailbox is closing. A stalled mailbox reports
    /// [`Closing::Stalled`] even while records wait (they will not be read); a lagging one
    /// first reports the records it still holds. Cancel-safe.
    pub(crate) async fn ready(&self) -> MailboxEvent {
        loop {
            let state = self.state.load(Ordering::Acquire);
            if state >= STALLED {
                return MailboxEvent::Closing(if state == STALLED {
                    Closing::Stalled
                } else {
                    Closing::Gone
                });
            }
            if !self.queue().is_empty() {
                return MailboxEvent::Ready;
            }
            if state == LAGGING {
                return MailboxEvent::Closing(Closing::Lagging);
            }
            // A push between the check and here leaves a permit: this returns at once.
            self.signal.notified().await;
        }
    }

    /// Resolves once the mailbox is stalled or gone: a session blocked in a socket write
    /// selects on it to give up at once.
    pub(crate) async fn stalled(&self) {
        loop {
            // Created before the check, so a `notify_waiters` in between is not missed.
            let notified = self.signal.notified();
            if self.state.load(Ordering::Acquire) >= STALLED {
                return;
            }
            notified.await;
        }
    }

    /// Moves up to `max` queued records into `batch` and frees their room.
    pub(crate) fn take(&self, batch: &mut Vec<Utf8Bytes>, max: usize) {
        let start = batch.len();
        {
            let mut queue = self.queue();
            let n = queue.len().min(max);
            batch.extend(queue.drain(..n));
            if queue.is_empty() && queue.capacity() > 64 {
                // Give back what a burst grew, so idle connections stay small.
                queue.shrink_to_fit();
            }
        }
        self.release(&batch[start..]);
    }

    /// Takes the oldest queued record and frees its room.
    pub(crate) fn pop(&self) -> Option<Utf8Bytes> {
        let record = self.queue().pop_front()?;
        self.release(std::slice::from_ref(&record));
        Some(record)
    }

    fn release(&self, taken: &[Utf8Bytes]) {
        if taken.is_empty() {
            return;
        }
        let room: usize = taken.iter().map(|r| self.cost(r) as usize).sum();
        self.room.add_permits(room);
        self.taken.fetch_add(taken.len() as u64, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use futures_util::FutureExt as _;

    use super::*;

    fn text(s: &'static str) -> Utf8Bytes {
        Utf8Bytes::from_static(s)
    }

    /// A sender, in a task of its own, waiting up to `wait` for room for `record`.
    fn waiting_sender(
        mailbox: &Arc<Mailbox>,
        record: &'static str,
        wait: Duration,
    ) -> tokio::task::JoinHandle<(Sent, bool)> {
        let mailbox = mailbox.clone();
        tokio::spawn(async move { mailbox.push_waiting(&text(record), wait).await })
    }

    #[test]
    fn records_queue_in_order_and_come_out_in_batches() {
        let mailbox = Mailbox::new(1 << 20);
        for t in ["1", "2", "3"] {
            assert_eq!(mailbox.offer(&text(t)), Offer::Done(Sent::Queued));
        }
        assert_eq!(mailbox.ready().now_or_never(), Some(MailboxEvent::Ready));
        let mut batch = Vec::new();
        mailbox.take(&mut batch, 2);
        assert_eq!(batch, ["1", "2"]);
        assert_eq!(mailbox.pop().as_deref(), Some("3"));
        assert_eq!(mailbox.pop(), None);
    }

    #[test]
    fn a_full_queue_asks_the_sender_to_wait_and_taking_makes_room() {
        // Room for exactly two one-byte records.
        let mailbox = Mailbox::new(2 * (1 + RECORD_OVERHEAD));
        assert_eq!(mailbox.offer(&text("a")), Offer::Done(Sent::Queued));
        assert_eq!(mailbox.offer(&text("b")), Offer::Done(Sent::Queued));
        assert_eq!(mailbox.offer(&text("c")), Offer::Full);
        assert_eq!(mailbox.pop().as_deref(), Some("a"));
        assert_eq!(mailbox.offer(&text("c")), Offer::Done(Sent::Queued));
        assert_eq!(mailbox.closing(), None, "a full queue alone closes nothing");
    }

    #[test]
    fn any_record_fits_an_empty_queue() {
        let mailbox = Mailbox::new(0);
        let big = Utf8Bytes::from("x".repeat(10_000));
        assert_eq!(mailbox.offer(&big), Offer::Done(Sent::Queued));
        assert_eq!(mailbox.offer(&big), Offer::Full);
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiting_sender_gets_room_when_the_session_takes() {
        let mailbox = Arc::new(Mailbox::new(1 + RECORD_OVERHEAD));
        assert_eq!(mailbox.offer(&text("a")), Offer::Done(Sent::Queued));
        let sender = waiting_sender(&mailbox, "b", Duration::from_secs(5));
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(mailbox.pop().as_deref(), Some("a"));
        assert_eq!(sender.await.expect("no panic"), (Sent::Queued, false));
        assert_eq!(mailbox.pop().as_deref(), Some("b"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_reader_that_takes_nothing_is_stalled_and_its_writes_give_up() {
        let mailbox = Arc::new(Mailbox::new(1 + RECORD_OVERHEAD));
        assert_eq!(mailbox.offer(&text("a")), Offer::Done(Sent::Queued));
        let blocked_write = {
            let mailbox = mailbox.clone();
            tokio::spawn(async move { mailbox.stalled().await })
        };
        let (sent, closed_here) = mailbox
            .push_waiting(&text("b"), Duration::from_secs(5))
            .await;
        assert_eq!(sent, Sent::NotReading);
        assert!(closed_here);
        assert_eq!(mailbox.closing(), Some(Closing::Stalled));
        blocked_write.await.expect("the blocked write is released");
        assert_eq!(
            mailbox.ready().now_or_never(),
            Some(MailboxEvent::Closing(Closing::Stalled)),
            "a stalled mailbox is abandoned even though a record waits"
        );
        assert_eq!(mailbox.offer(&text("c")), Offer::Done(Sent::NotReading));
    }

    #[tokio::test(start_paused = true)]
    async fn a_reader_that_falls_behind_is_lagging_and_first_gets_what_is_queued() {
        let mailbox = Arc::new(Mailbox::new(2 * (1 + RECORD_OVERHEAD)));
        assert_eq!(mailbox.offer(&text("a")), Offer::Done(Sent::Queued));
        assert_eq!(mailbox.offer(&text("b")), Offer::Done(Sent::Queued));
        // Two senders wait; the reader frees room for one of them only.
        let first = waiting_sender(&mailbox, "c", Duration::from_secs(5));
        tokio::task::yield_now().await;
        let second = waiting_sender(&mailbox, "d", Duration::from_secs(5));
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(mailbox.pop().as_deref(), Some("a"));
        assert_eq!(first.await.expect("no panic"), (Sent::Queued, false));
        assert_eq!(second.await.expect("no panic"), (Sent::NotReading, true));
        assert_eq!(mailbox.closing(), Some(Closing::Lagging));
        let mut batch = Vec::new();
        assert_eq!(mailbox.ready().now_or_never(), Some(MailboxEvent::Ready));
        mailbox.take(&mut batch, 10);
        assert_eq!(batch, ["b", "c"], "what was queued is still delivered");
        assert_eq!(
            mailbox.ready().now_or_never(),
            Some(MailboxEvent::Closing(Closing::Lagging))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_blocked_session_stalls_its_mailbox_only_when_a_sender_waits() {
        let mailbox = Arc::new(Mailbox::new(1 + RECORD_OVERHEAD));
        assert_eq!(mailbox.offer(&text("a")), Offer::Done(Sent::Queued));
        assert!(
            !mailbox.stall_if_awaited(),
            "nobody waits: a full queue is fine"
        );
        let sender = waiting_sender(&mailbox, "b", Duration::from_secs(3600));
        tokio::task::yield_now().await;
        assert!(mailbox.stall_if_awaited());
        assert_eq!(sender.await.expect("no panic"), (Sent::NotReading, false));
        assert_eq!(mailbox.closing(), Some(Closing::Stalled));
    }

    #[tokio::test]
    async fn a_mailbox_that_is_gone_wakes_waiting_senders_at_once() {
        let mailbox = Arc::new(Mailbox::new(1 + RECORD_OVERHEAD));
        assert_eq!(mailbox.offer(&text("a")), Offer::Done(Sent::Queued));
        let sender = waiting_sender(&mailbox, "b", Duration::from_secs(3600));
        tokio::task::yield_now().await;
        assert!(mailbox.close(Closing::Gone));
        assert_eq!(sender.await.expect("no panic"), (Sent::Gone, false));
        assert_eq!(mailbox.offer(&text("c")), Offer::Done(Sent::Gone));
    }

    #[tokio::test]
    async fn a_waiting_session_is_woken_by_a_send() {
        let mailbox = Arc::new(Mailbox::new(1024));
        let waiter = {
            let mailbox = mailbox.clone();
            tokio::spawn(async move { mailbox.ready().await })
        };
        tokio::task::yield_now().await;
        assert_eq!(mailbox.offer(&text("x")), Offer::Done(Sent::Queued));
        assert_eq!(waiter.await.expect("no panic"), MailboxEvent::Ready);
    }
}
