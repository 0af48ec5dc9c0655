//! What the connections count: protocol anomalies, and each receiver's and sender's results.

use std::sync::atomic::AtomicU64;

/// Protocol-level observations, merged over all connections.
#[derive(Default, Debug, Clone)]
pub(crate) struct Anomalies {
    /// `showErrorMessage` invocations.
    pub(crate) show_error: u64,
    /// Close records from the server.
    pub(crate) close_records: u64,
    /// Completions carrying an error.
    pub(crate) completion_errors: u64,
    /// Completions on a non-blocking invocation or for an unknown id.
    pub(crate) stray_completions: u64,
    /// Invocations with an id whose Completion never came.
    pub(crate) missing_completions: u64,
    /// Deliveries whose payload named another user.
    pub(crate) misrouted: u64,
    /// Records we could not make sense of.
    pub(crate) unknown_records: u64,
    /// Binary frames (this is a JSON connection).
    pub(crate) binary_frames: u64,
    /// Text frames that did not end on a record separator.
    pub(crate) partial_frames: u64,
    /// Connections that ended before we stopped them (server close, EOF, error).
    pub(crate) unexpected_closes: u64,
    /// Send failures.
    pub(crate) send_errors: u64,
    /// Up to a few examples of what went wrong, for the report.
    pub(crate) samples: Vec<String>,
}

impl Anomalies {
    /// Keeps `s` as an example, unless there are enough already.
    pub(crate) fn note(&mut self, s: impl Into<String>) {
        if self.samples.len() < 8 {
            self.samples.push(s.into());
        }
    }

    /// Adds `o`'s counts and examples to these.
    pub(crate) fn merge(&mut self, o: Anomalies) {
        self.show_error += o.show_error;
        self.close_records += o.close_records;
        self.completion_errors += o.completion_errors;
        self.stray_completions += o.stray_completions;
        self.missing_completions += o.missing_completions;
        self.misrouted += o.misrouted;
        self.unknown_records += o.unknown_records;
        self.binary_frames += o.binary_frames;
        self.partial_frames += o.partial_frames;
        self.unexpected_closes += o.unexpected_closes;
        self.send_errors += o.send_errors;
        for s in o.samples {
            self.note(s);
        }
    }

    /// All anomalies together.
    pub(crate) fn errors(&self) -> u64 {
        self.show_error
            + self.close_records
            + self.completion_errors
            + self.stray_completions
            + self.missing_completions
            + self.misrouted
            + self.unknown_records
            + self.binary_frames
            + self.partial_frames
            + self.unexpected_closes
            + self.send_errors
    }
}

/// Shared between the receivers and the coordinator (only for the early end of the drain).
#[derive(Default)]
pub(crate) struct Live {
    /// Measured deliveries so far, over all receivers.
    pub(crate) measured_deliveries: AtomicU64,
}

/// What one receiver connection saw.
pub(crate) struct RecvResult {
    /// The receiver user it belongs to.
    pub(crate) user: usize,
    /// Latency of each measured delivery, microseconds.
    pub(crate) latencies_us: Vec<u32>,
    /// Measured deliveries.
    pub(crate) measured: u64,
    /// Warm-up deliveries.
    pub(crate) warmup: u64,
    /// What went wrong.
    pub(crate) anomalies: Anomalies,
}

/// What one sender (or one open-loop pacer, for its senders) sent and saw.
pub(crate) struct SendResult {
    /// Measured messages per target user.
    pub(crate) per_target: Vec<u32>,
    /// Closed loop: invocation → Completion round trips, microseconds.
    pub(crate) rtt_us: Vec<u32>,
    /// Measured messages.
    pub(crate) measured: u64,
    /// Warm-up messages.
    pub(crate) warmup: u64,
    /// Open loop: the furthest a message went out behind its intended time, nanoseconds.
    pub(crate) max_lag_ns: u64,
    /// Open loop: messages that went out more than 1 ms late.
    pub(crate) late_1ms: u64,
    /// What went wrong.
    pub(crate) anomalies: Anomalies,
}

impl SendResult {
    /// Nothing sent yet, to any of `users` receiver users.
    pub(crate) fn new(users: usize) -> Self {
        Self {
            per_target: vec![0; users],
            rtt_us: Vec::new(),
            measured: 0,
            warmup: 0,
            max_lag_ns: 0,
            late_1ms: 0,
            anomalies: Anomalies::default(),
        }
    }

    /// Adds `o`'s counts, round trips and anomalies to these.
    pub(crate) fn merge(&mut self, o: SendResult) {
        for (a, b) in self.per_target.iter_mut().zip(&o.per_target) {
            *a += b;
        }
        self.measured += o.measured;
        self.warmup += o.warmup;
        self.max_lag_ns = self.max_lag_ns.max(o.max_lag_ns);
        self.late_1ms += o.late_1ms;
        self.rtt_us.extend_from_slice(&o.rtt_us);
        self.anomalies.merge(o.anomalies);
    }
}

/// What the receivers got, over all of them.
#[derive(Default)]
pub(crate) struct Deliveries {
    /// Latency of each measured delivery, microseconds.
    pub(crate) latencies_us: Vec<u32>,
    /// Measured deliveries.
    pub(crate) measured: u64,
    /// Warm-up deliveries.
    pub(crate) warmup: u64,
    /// Measured deliveries that did not arrive (per connection, expected minus received).
    pub(crate) losses: u64,
    /// Measured deliveries beyond those expected (per connection).
    pub(crate) duplicates: u64,
}
