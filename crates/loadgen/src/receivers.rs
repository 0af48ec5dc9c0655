//! Receiver connections: they read deliveries, check each was meant for their user and
//! record its latency; they send nothing but keep-alive Pings.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::{SinkExt as _, StreamExt as _};
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;

use crate::connect::Conn;
use crate::counters::{Anomalies, Live, RecvResult};
use crate::util::now_ns;
use crate::wire::{KEEPALIVE, PING, Record, classify, records};

/// One receiver's running counts.
struct RecvCtx {
    /// The receiver user this connection belongs to.
    user: usize,
    /// Latency of each measured delivery, microseconds.
    latencies_us: Vec<u32>,
    /// Measured deliveries.
    measured: u64,
    /// Warm-up deliveries.
    warmup: u64,
    /// What went wrong.
    anomalies: Anomalies,
    /// The count shared with the coordinator.
    live: Arc<Live>,
}

impl RecvCtx {
    /// Counts the records of one received frame, which arrived at `now`.
    fn frame(&mut self, frame: &[u8], now: u64) {
        let (recs, whole) = records(frame);
        if !whole {
            self.anomalies.partial_frames += 1;
            self.anomalies
                .note("text frame not ending on a record separator");
        }
        let mut measured = 0;
        for rec in recs {
            match classify(rec) {
                Record::Chat(e) => {
                    if e.target != self.user as u64 {
                        self.anomalies.misrouted += 1;
                        self.anomalies.note(format!(
                            "user-{} received a message for user-{}",
                            self.user, e.target
                        ));
                    }
                    if e.measured {
                        measured += 1;
                        let us = now.saturating_sub(e.intended_ns) / 1000;
                        self.latencies_us
                            .push(u32::try_from(us).unwrap_or(u32::MAX));
                    } else {
                        self.warmup += 1;
                    }
                }
                Record::Ping => {}
                Record::Completion { .. } => {
                    self.anomalies.stray_completions += 1;
                    self.anomalies
                        .note("Completion received by a receiver that invoked nothing");
                }
                Record::Close(err) => {
                    self.anomalies.close_records += 1;
                    self.anomalies.note(format!("Close record: {err:?}"));
                }
                Record::ShowError(m) => {
                    self.anomalies.show_error += 1;
                    self.anomalies.note(format!("showErrorMessage: {m}"));
                }
                Record::Other(t) => {
                    self.anomalies.unknown_records += 1;
                    self.anomalies.note(format!("unexpected record: {t}"));
                }
            }
        }
        if measured > 0 {
            self.measured += measured;
            self.live
                .measured_deliveries
                .fetch_add(measured, Ordering::Relaxed);
        }
    }
}

/// Reads until `stop`, answering nothing but sending a Ping every 15 s.
pub(crate) async fn receiver(
    conn: Conn,
    user: usize,
    live: Arc<Live>,
    mut stop: watch::Receiver<bool>,
) -> RecvResult {
    let Conn { mut ws, leftover } = conn;
    let mut ctx = RecvCtx {
        user,
        latencies_us: Vec::new(),
        measured: 0,
        warmup: 0,
        anomalies: Anomalies::default(),
        live,
    };
    if let Some(l) = leftover {
        ctx.frame(&l, now_ns());
    }
    let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + KEEPALIVE, KEEPALIVE);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let stopped = stop.changed();
    tokio::pin!(stopped);
    let mut graceful = true;
    loop {
        tokio::select! {
            _ = &mut stopped => break,
            m = ws.next() => match m {
                Some(Ok(Message::Text(t))) => ctx.frame(t.as_bytes(), now_ns()),
                Some(Ok(Message::Binary(b))) => {
                    ctx.anomalies.binary_frames += 1;
                    ctx.anomalies.note("binary frame on a JSON connection");
                    ctx.frame(&b, now_ns());
                }
                Some(Ok(Message::Close(c))) => {
                    ctx.anomalies.unexpected_closes += 1;
                    ctx.anomalies.note(format!("server closed a receiver: {c:?}"));
                    graceful = false;
                    break;
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    ctx.anomalies.unexpected_closes += 1;
                    ctx.anomalies.note(format!("receiver read error: {e}"));
                    graceful = false;
                    break;
                }
                None => {
                    ctx.anomalies.unexpected_closes += 1;
                    ctx.anomalies.note("receiver connection ended");
                    graceful = false;
                    break;
                }
            },
            _ = ping.tick() => {
                if let Err(e) = ws.send(Message::Text(PING)).await {
                    ctx.anomalies.send_errors += 1;
                    ctx.anomalies.note(format!("ping failed: {e}"));
                    graceful = false;
                    break;
                }
            }
        }
    }
    if graceful {
        let _ = tokio::time::timeout(Duration::from_secs(1), ws.close(None)).await;
    }
    RecvResult {
        user,
        latencies_us: ctx.latencies_us,
        measured: ctx.measured,
        warmup: ctx.warmup,
        anomalies: ctx.anomalies,
    }
}
