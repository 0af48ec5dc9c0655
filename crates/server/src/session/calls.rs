//! Hub method calls of one connection: the invocation rate, the calls in flight, and their
//! Completions.

use std::borrow::Cow;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::StreamExt as _;
use futures_util::stream::FuturesUnordered;
use serde_json::value::RawValue;
use tokio::time::Instant;
use tracing::{error, warn};

use super::{ConnectionInfo, End, Session, Until};
use crate::config::HubOptions;
use crate::hub::{BoxFuture, HubContext, HubError, InvokeError};
use crate::state::Shared;
use crate::throttle::Throttle;

/// Log lines about hub methods that failed or panicked: a client decides how often.
static FAILED: Throttle = Throttle::new(10, Duration::from_secs(10));

/// Log lines about connections slowed down by their invocation rate.
static SLOWED: Throttle = Throttle::new(10, Duration::from_secs(10));

/// The calls of one connection that are running, and its invocation rate.
pub(super) struct Calls {
    /// Allocated at the first call that does not finish at once, so idle connections and
    /// connections whose calls finish at once carry none.
    running: Option<FuturesUnordered<Call>>,
    max_running: usize,
    rate: Option<Rate>,
    /// Whether this connection was slowed down already (logged once per connection).
    slowed: bool,
}

impl Calls {
    pub(super) fn new(options: &HubOptions) -> Self {
        Self {
            running: None,
            max_running: options.max_parallel_invocations.max(1),
            rate: Rate::new(options.max_invocations_per_second, Instant::now()),
            slowed: false,
        }
    }

    /// Whether a call is running.
    pub(super) fn busy(&self) -> bool {
        self.running.as_ref().is_some_and(|r| !r.is_empty())
    }

    /// Whether another call may start.
    pub(super) fn has_room(&self) -> bool {
        self.running
            .as_ref()
            .is_none_or(|r| r.len() < self.max_running)
    }

    /// The next call to complete; never resolves while none runs.
    pub(super) async fn next(&mut self) -> Option<Done> {
        match &mut self.running {
            Some(running) if !running.is_empty() => running.next().await,
            _ => std::future::pending().await,
        }
    }

    fn push(&mut self, call: Call) {
        self.running
            .get_or_insert_with(FuturesUnordered::new)
            .push(call);
    }
}

/// A token bucket (GCRA) of `per_second` invocations on average and `burst` at once. Only the
/// time the bucket is full again is kept per connection; the rest comes from the options.
#[derive(Debug)]
struct Rate {
    /// When the bucket is full again (the theoretical arrival time).
    full_at: Instant,
}

impl Rate {
    fn new(per_second: u32, now: Instant) -> Option<Self> {
        (per_second > 0).then_some(Self { full_at: now })
    }

    /// Takes one invocation's worth; returns when it may start, if that is later than `now`.
    fn reserve(&mut self, per_second: u32, burst: u32, now: Instant) -> Option<Instant> {
        let interval = Duration::from_secs(1) / per_second.max(1);
        let tolerance = interval * burst.max(1).saturating_sub(1);
        let full_at = self.full_at.max(now);
        let allowed = full_at.checked_sub(tolerance).unwrap_or(now);
        self.full_at = full_at + interval;
        (allowed > now).then_some(allowed)
    }
}

/// A running hub method call.
pub(super) struct Call {
    id: Option<Box<str>>,
    target: Box<str>,
    future: BoxFuture<Result<Box<RawValue>, HubError>>,
}

/// A call that completed.
pub(super) struct Done {
    id: Option<Box<str>>,
    target: Box<str>,
    outcome: Result<Result<Box<RawValue>, HubError>, Panicked>,
}

/// The call panicked.
struct Panicked;

impl Future for Call {
    type Output = Done;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Done> {
        let this = &mut *self;
        let outcome =
            match std::panic::catch_unwind(AssertUnwindSafe(|| this.future.as_mut().poll(cx))) {
                Ok(Poll::Pending) => return Poll::Pending,
                Ok(Poll::Ready(result)) => Ok(result),
                Err(_) => Err(Panicked),
            };
        Poll::Ready(Done {
            id: this.id.take(),
            target: std::mem::take(&mut this.target),
            outcome,
        })
    }
}

/// Starts a call: looks the method up and decodes its arguments. `Err` carries the
/// invocation id and the error text for the caller.
pub(super) fn start(
    inner: &Shared,
    info: &ConnectionInfo,
    invocation_id: Option<Cow<'_, str>>,
    target: &str,
    arguments: &RawValue,
) -> Result<Call, (Option<Box<str>>, String)> {
    let id = invocation_id.map(|id| Box::from(id.as_ref()));
    let ctx = HubContext::new(inner.router.clone(), info.user.clone(), info.id.clone());
    match inner.hub.invoke(ctx, target, arguments) {
        Ok(future) => Ok(Call {
            id,
            target: Box::from(target),
            future,
        }),
        Err(InvokeError::UnknownMethod) => Err((id, format!("Unknown hub method '{target}'"))),
        Err(InvokeError::Hub(e)) => Err((id, e.client_message(target))),
    }
}

impl Session<'_> {
    /// Waits until the connection may start another call: within its invocation rate and
    /// below its calls in flight. Meanwhile its queue is written and its calls complete, but
    /// nothing more is read from its socket.
    pub(super) async fn admit_call(&mut self) -> Result<(), End> {
        let now = Instant::now();
        let options = &self.inner.options;
        let (per_second, burst) = (options.max_invocations_per_second, options.invocation_burst);
        if let Some(at) = self
            .calls
            .rate
            .as_mut()
            .and_then(|rate| rate.reserve(per_second, burst, now))
        {
            if !self.calls.slowed {
                self.calls.slowed = true;
                if let Some(suppressed) = SLOWED.allow() {
                    let options = &self.inner.options;
                    warn!(
                        connection = %self.info.id,
                        user = %self.info.user,
                        per_second = options.max_invocations_per_second,
                        burst = options.invocation_burst,
                        suppressed,
                        "slowing down a connection that invokes faster than its rate"
                    );
                }
            }
            self.serve_until(Until::Time(at)).await?;
            // The client was alive all along: its records waited on our side.
            self.last_read = Instant::now();
        }
        while !self.calls.has_room() {
            self.serve_until(Until::CallDone).await?;
            self.last_read = Instant::now();
        }
        Ok(())
    }

    /// Runs a call: once at once (most calls finish without waiting), else among the calls in
    /// flight.
    pub(super) async fn run_call(&mut self, mut call: Call) -> Result<(), End> {
        let first = std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut call).poll(cx))).await;
        match first {
            Poll::Ready(done) => self.complete(done).await,
            Poll::Pending => {
                self.calls.push(call);
                Ok(())
            }
        }
    }

    /// Answers a completed call (and logs failures).
    pub(super) async fn complete(&mut self, done: Done) -> Result<(), End> {
        let Done {
            id,
            target,
            outcome,
        } = done;
        let reply = match outcome {
            Ok(Ok(result)) => Ok(result),
            Ok(Err(e)) => {
                if let Some(suppressed) = FAILED.allow() {
                    warn!(
                        connection = %self.info.id,
                        user = %self.info.user,
                        method = &*target,
                        error = %e,
                        suppressed,
                        "hub method failed"
                    );
                }
                Err(e.client_message(&target))
            }
            Err(Panicked) => {
                if let Some(suppressed) = FAILED.allow() {
                    error!(
                        connection = %self.info.id,
                        user = %self.info.user,
                        method = &*target,
                        suppressed,
                        "hub method panicked"
                    );
                }
                Err(format!(
                    "An unexpected error occurred invoking '{target}' on the server."
                ))
            }
        };
        self.reply(id.as_deref(), &target, reply).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rate_allows_a_burst_then_spaces_invocations_out() {
        let t = Instant::now();
        let mut rate = Rate::new(10, t).expect("limited");
        assert_eq!(rate.reserve(10, 3, t), None);
        assert_eq!(rate.reserve(10, 3, t), None);
        assert_eq!(rate.reserve(10, 3, t), None);
        // The fourth waits one interval (100 ms), the fifth two.
        assert_eq!(rate.reserve(10, 3, t), Some(t + Duration::from_millis(100)));
        assert_eq!(rate.reserve(10, 3, t), Some(t + Duration::from_millis(200)));
        // After a quiet second, the whole burst is back.
        let later = t + Duration::from_secs(2);
        for _ in 0..3 {
            assert_eq!(rate.reserve(10, 3, later), None);
        }
        assert!(rate.reserve(10, 3, later).is_some());
        assert!(Rate::new(0, t).is_none(), "0 turns the limit off");
    }
}
