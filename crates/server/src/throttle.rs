//! Rate limits for log lines a client can trigger.
//!
//! A client must not be able to make the server write more log than it sends: every warning a
//! client can cause goes through a [`Throttle`], which lets a few lines through, then at most
//! one per interval, and counts what it held back so the next line can say how many.

use std::sync::Mutex;
use std::sync::PoisonError;
use std::time::Duration;

use tokio::time::Instant;

/// Lets through `burst` events per `interval` and counts the rest.
///
/// ```ignore
/// static DROPPED: Throttle = Throttle::new(10, Duration::from_secs(10));
/// if let Some(suppressed) = DROPPED.allow() {
///     tracing::warn!(suppressed, "dropped a client");
/// }
/// ```
#[derive(Debug)]
pub(crate) struct Throttle {
    burst: u32,
    interval: Duration,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    window_start: Option<Instant>,
    in_window: u32,
    suppressed: u64,
}

impl Throttle {
    /// At most `burst` lines per `interval`.
    pub(crate) const fn new(burst: u32, interval: Duration) -> Self {
        Self {
            burst,
            interval,
            state: Mutex::new(State {
                window_start: None,
                in_window: 0,
                suppressed: 0,
            }),
        }
    }

    /// `Some(n)` when this event may be logged, with `n` events held back since the last line
    /// that was; `None` when it must not be logged (it is counted).
    pub(crate) fn allow(&self) -> Option<u64> {
        self.allow_at(Instant::now())
    }

    fn allow_at(&self, now: Instant) -> Option<u64> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let window_over = state
            .window_start
            .is_none_or(|start| now.duration_since(start) >= self.interval);
        if window_over {
            state.window_start = Some(now);
            state.in_window = 0;
        }
        if state.in_window < self.burst {
            state.in_window += 1;
            Some(std::mem::take(&mut state.suppressed))
        } else {
            state.suppressed += 1;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_passes_then_the_rest_is_counted_until_the_next_window() {
        let throttle = Throttle::new(2, Duration::from_secs(10));
        let t = Instant::now();
        assert_eq!(throttle.allow_at(t), Some(0));
        assert_eq!(throttle.allow_at(t), Some(0));
        for _ in 0..1000 {
            assert_eq!(throttle.allow_at(t + Duration::from_secs(1)), None);
        }
        assert_eq!(
            throttle.allow_at(t + Duration::from_secs(10)),
            Some(1000),
            "the next line says how many were held back"
        );
        assert_eq!(throttle.allow_at(t + Duration::from_secs(10)), Some(0));
        assert_eq!(throttle.allow_at(t + Duration::from_secs(11)), None);
    }
}
