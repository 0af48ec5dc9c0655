//! Sender connections: the run's schedule, closed-loop senders (a window of invocations in
//! flight each) and open-loop pacers (a fixed schedule spread over the senders).

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt as _, StreamExt as _};
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;

use crate::connect::{Conn, Ws};
use crate::counters::{Anomalies, SendResult};
use crate::util::{XorShift, instant_at, now_ns};
use crate::wire::{FrameBuilder, KEEPALIVE, PING, Record, classify, records};

/// Times of the run, in nanoseconds since the epoch.
pub(crate) struct Sched {
    /// When the senders start (the warm-up begins).
    pub(crate) start_ns: u64,
    /// End of the warm-up: messages intended from here on are measured.
    pub(crate) measure_ns: u64,
    /// End of the measured window; pulled in by Ctrl-C.
    pub(crate) end_ns: AtomicU64,
    /// Until when the run waits for outstanding deliveries and Completions.
    pub(crate) drain_deadline_ns: AtomicU64,
}

impl Sched {
    /// The end of the measured window, as it stands now.
    pub(crate) fn end(&self) -> u64 {
        self.end_ns.load(Ordering::Relaxed)
    }
}

/// What all senders share.
pub(crate) struct SendCfg {
    /// Number of receiver users to choose targets from.
    pub(crate) users: usize,
    /// Closed loop: invocations in flight per sender.
    pub(crate) window: usize,
    /// Seed of the target-choosing generators.
    pub(crate) seed: u64,
    /// Open loop: yield-spin instead of sleeping when the next message is due this soon.
    pub(crate) spin_ns: u64,
    /// Builds the invocations.
    pub(crate) frames: FrameBuilder,
}

/// The target-choosing generator of sender `sender`.
fn sender_rng(seed: u64, sender: usize) -> XorShift {
    XorShift::new(seed ^ ((sender as u64) << 32 | 0x5bd1))
}

/// Closed loop: keeps `window` invocations in flight until the end of the window, then
/// waits for the outstanding Completions (until the drain deadline).
pub(crate) async fn closed_sender(
    conn: Conn,
    idx: usize,
    cfg: Arc<SendCfg>,
    sched: Arc<Sched>,
) -> SendResult {
    let Conn { mut ws, leftover } = conn;
    let mut res = SendResult::new(cfg.users);
    let mut rng = sender_rng(cfg.seed, idx);
    let mut outstanding: VecDeque<(u64, u64)> = VecDeque::with_capacity(cfg.window);
    let mut next_id: u64 = 0;
    if let Some(l) = leftover {
        sender_frame(&l, &mut outstanding, &mut res, true);
    }
    let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + KEEPALIVE, KEEPALIVE);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::time::sleep_until(instant_at(sched.start_ns)).await;
    let mut graceful = true;
    'run: loop {
        if now_ns() < sched.end() {
            let mut fed = false;
            while outstanding.len() < cfg.window {
                let t = now_ns();
                let target = rng.below(cfg.users);
                let measured = t >= sched.measure_ns;
                let frame = cfg
                    .frames
                    .build(target, next_id, t, measured, Some(next_id));
                if let Err(e) = ws.feed(Message::Text(frame)).await {
                    res.anomalies.send_errors += 1;
                    res.anomalies.note(format!("send failed: {e}"));
                    graceful = false;
                    break 'run;
                }
                if measured {
                    res.per_target[target] += 1;
                    res.measured += 1;
                } else {
                    res.warmup += 1;
                }
                outstanding.push_back((next_id, t));
                next_id += 1;
                fed = true;
            }
            if fed && let Err(e) = ws.flush().await {
                res.anomalies.send_errors += 1;
                res.anomalies.note(format!("flush failed: {e}"));
                graceful = false;
                break;
            }
        } else if outstanding.is_empty() {
            break;
        }
        let deadline = instant_at(sched.drain_deadline_ns.load(Ordering::Relaxed));
        tokio::select! {
            m = ws.next() => match m {
                Some(Ok(Message::Text(t))) => {
                    sender_frame(t.as_bytes(), &mut outstanding, &mut res, true);
                }
                Some(Ok(Message::Binary(b))) => {
                    res.anomalies.binary_frames += 1;
                    sender_frame(&b, &mut outstanding, &mut res, true);
                }
                Some(Ok(Message::Close(c))) => {
                    res.anomalies.unexpected_closes += 1;
                    res.anomalies.note(format!("server closed a sender: {c:?}"));
                    graceful = false;
                    break;
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    res.anomalies.unexpected_closes += 1;
                    res.anomalies.note(format!("sender read error: {e}"));
                    graceful = false;
                    break;
                }
                None => {
                    res.anomalies.unexpected_closes += 1;
                    res.anomalies.note("sender connection ended");
                    graceful = false;
                    break;
                }
            },
            _ = tokio::time::sleep_until(deadline) => break,
            _ = ping.tick() => {
                if let Err(e) = ws.send(Message::Text(PING)).await {
                    res.anomalies.send_errors += 1;
                    res.anomalies.note(format!("ping failed: {e}"));
                    graceful = false;
                    break;
                }
            }
        }
    }
    if !outstanding.is_empty() {
        res.anomalies.missing_completions += outstanding.len() as u64;
        res.anomalies.note(format!(
            "sender-{idx}: {} invocations without Completion",
            outstanding.len()
        ));
    }
    if graceful {
        let _ = tokio::time::timeout(Duration::from_secs(1), ws.close(None)).await;
    }
    res
}

/// Handles what a sender receives: Completions (expected only with ids), Pings, errors.
/// `outstanding` holds the ids in flight with their send times.
pub(crate) fn sender_frame(
    frame: &[u8],
    outstanding: &mut VecDeque<(u64, u64)>,
    res: &mut SendResult,
    expect_completions: bool,
) {
    let now = now_ns();
    let an = &mut res.anomalies;
    let (recs, whole) = records(frame);
    if !whole {
        an.partial_frames += 1;
        an.note("text frame not ending on a record separator");
    }
    for rec in recs {
        match classify(rec) {
            Record::Completion { id, error } => {
                if error {
                    an.completion_errors += 1;
                    an.note(format!(
                        "error Completion: {}",
                        String::from_utf8_lossy(rec)
                    ));
                }
                let pos = id.and_then(|id| {
                    if outstanding.front().is_some_and(|o| o.0 == id) {
                        Some(0)
                    } else {
                        outstanding.iter().position(|o| o.0 == id)
                    }
                });
                match pos {
                    Some(p) if expect_completions => {
                        if let Some((_, sent)) = outstanding.remove(p) {
                            let us = now.saturating_sub(sent) / 1000;
                            res.rtt_us.push(u32::try_from(us).unwrap_or(u32::MAX));
                        }
                    }
                    _ => {
                        an.stray_completions += 1;
                        an.note(format!(
                            "unexpected Completion: {}",
                            String::from_utf8_lossy(rec)
                        ));
                    }
                }
            }
            Record::Ping => {}
            Record::Close(err) => {
                an.close_records += 1;
                an.note(format!("Close record: {err:?}"));
            }
            Record::ShowError(m) => {
                an.show_error += 1;
                an.note(format!("showErrorMessage: {m}"));
            }
            Record::Chat(_) => {
                an.misrouted += 1;
                an.note("a sender (never addressed) received addChatMessage");
            }
            Record::Other(t) => {
                an.unknown_records += 1;
                an.note(format!("unexpected record: {t}"));
            }
        }
    }
}

/// The write half of a sender's WebSocket.
pub(crate) type Sink = SplitSink<Ws, Message>;
/// The read half of a sender's WebSocket.
pub(crate) type Stream = SplitStream<Ws>;

/// Open loop, read side of a sender: nothing should come back but Pings.
pub(crate) async fn sender_reader(
    idx: usize,
    mut stream: Stream,
    mut stop: watch::Receiver<bool>,
) -> (usize, Option<Stream>, Anomalies) {
    let mut res = SendResult::new(0);
    let mut none = VecDeque::new();
    let stopped = stop.changed();
    tokio::pin!(stopped);
    loop {
        tokio::select! {
            _ = &mut stopped => return (idx, Some(stream), res.anomalies),
            m = stream.next() => match m {
                Some(Ok(Message::Text(t))) => sender_frame(t.as_bytes(), &mut none, &mut res, false),
                Some(Ok(Message::Binary(b))) => {
                    res.anomalies.binary_frames += 1;
                    sender_frame(&b, &mut none, &mut res, false);
                }
                Some(Ok(Message::Close(c))) => {
                    res.anomalies.unexpected_closes += 1;
                    res.anomalies.note(format!("server closed a sender: {c:?}"));
                    return (idx, None, res.anomalies);
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    res.anomalies.unexpected_closes += 1;
                    res.anomalies.note(format!("sender read error: {e}"));
                    return (idx, None, res.anomalies);
                }
                None => {
                    res.anomalies.unexpected_closes += 1;
                    res.anomalies.note("sender connection ended");
                    return (idx, None, res.anomalies);
                }
            },
        }
    }
}

/// One open-loop sender, as its pacer drives it.
pub(crate) struct PacedSender {
    /// The sender's index (`sender-<idx>`).
    idx: usize,
    /// Where its messages go.
    sink: Sink,
    /// Its target-choosing generator.
    rng: XorShift,
    /// Its place in the schedule: `idx / rate`, nanoseconds (set by the pacer).
    offset_ns: f64,
    /// False once a send or flush failed.
    alive: bool,
    /// Fed but not flushed yet.
    dirty: bool,
    /// When it last sent something, for the keep-alive.
    last_send_ns: u64,
}

impl PacedSender {
    /// Sender `idx`, writing to `sink`, with the target generator of `seed`.
    pub(crate) fn new(idx: usize, sink: Sink, seed: u64) -> Self {
        Self {
            idx,
            sink,
            rng: sender_rng(seed, idx),
            offset_ns: 0.0,
            alive: true,
            dirty: false,
            last_send_ns: 0,
        }
    }
}

/// Open loop: drives its share of the senders on the fixed schedule. Sender `idx` sends
/// message k at `start + idx/R + k·S/R`.
pub(crate) async fn pacer(
    mut senders: Vec<PacedSender>,
    total_senders: usize,
    rate: f64,
    cfg: Arc<SendCfg>,
    sched: Arc<Sched>,
) -> (SendResult, Vec<(usize, Sink)>) {
    let mut res = SendResult::new(cfg.users);
    let n = senders.len() as u64;
    let interval_ns = total_senders as f64 / rate * 1e9;
    for s in &mut senders {
        s.offset_ns = s.idx as f64 / rate * 1e9;
        s.last_send_ns = now_ns();
    }
    let mut m: u64 = 0;
    let mut batch = 0u32;
    let mut next_keepalive_check = now_ns() + 1_000_000_000;
    if n > 0 {
        loop {
            let j = (m % n) as usize;
            let round = m / n;
            let intended =
                sched.start_ns + (senders[j].offset_ns + round as f64 * interval_ns) as u64;
            if intended >= sched.end() {
                break;
            }
            let now = now_ns();
            if intended > now {
                flush_dirty(&mut senders, &mut res.anomalies).await;
                batch = 0;
                if now >= next_keepalive_check {
                    keepalive(&mut senders, now, &mut res.anomalies).await;
                    next_keepalive_check = now + 1_000_000_000;
                }
                let wait = intended - now;
                if wait > cfg.spin_ns {
                    let wake = (intended - cfg.spin_ns).min(now + 1_000_000_000);
                    tokio::time::sleep_until(instant_at(wake)).await;
                } else {
                    tokio::task::yield_now().await;
                }
                continue;
            }
            m += 1;
            let s = &mut senders[j];
            if !s.alive {
                continue;
            }
            let lag = now - intended;
            res.max_lag_ns = res.max_lag_ns.max(lag);
            if lag > 1_000_000 {
                res.late_1ms += 1;
            }
            let target = s.rng.below(cfg.users);
            let measured = intended >= sched.measure_ns;
            let frame = cfg.frames.build(target, round, intended, measured, None);
            match s.sink.feed(Message::Text(frame)).await {
                Ok(()) => {
                    s.dirty = true;
                    s.last_send_ns = now;
                    if measured {
                        res.per_target[target] += 1;
                        res.measured += 1;
                    } else {
                        res.warmup += 1;
                    }
                }
                Err(e) => {
                    s.alive = false;
                    res.anomalies.send_errors += 1;
                    res.anomalies
                        .note(format!("sender-{} send failed: {e}", s.idx));
                }
            }
            batch += 1;
            if batch >= 64 {
                flush_dirty(&mut senders, &mut res.anomalies).await;
                batch = 0;
            }
        }
    }
    flush_dirty(&mut senders, &mut res.anomalies).await;
    let sinks = senders
        .into_iter()
        .filter(|s| s.alive)
        .map(|s| (s.idx, s.sink))
        .collect();
    (res, sinks)
}

/// Flushes the senders that were fed since their last flush.
async fn flush_dirty(senders: &mut [PacedSender], an: &mut Anomalies) {
    for s in senders.iter_mut().filter(|s| s.dirty && s.alive) {
        s.dirty = false;
        if let Err(e) = s.sink.flush().await {
            s.alive = false;
            an.send_errors += 1;
            an.note(format!("sender-{} flush failed: {e}", s.idx));
        }
    }
}

/// Pings the senders that have been silent for the keep-alive interval (only matters at very
/// low rates).
async fn keepalive(senders: &mut [PacedSender], now: u64, an: &mut Anomalies) {
    let quiet = KEEPALIVE.as_nanos() as u64;
    for s in senders.iter_mut().filter(|s| s.alive) {
        if now.saturating_sub(s.last_send_ns) >= quiet {
            s.last_send_ns = now;
            if let Err(e) = s.sink.send(Message::Text(PING)).await {
                s.alive = false;
                an.send_errors += 1;
                an.note(format!("sender-{} ping failed: {e}", s.idx));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn completions_match_outstanding() {
        let mut out: VecDeque<(u64, u64)> = [(1, 0), (2, 0), (3, 0)].into_iter().collect();
        let mut res = SendResult::new(1);
        sender_frame(
            b"{\"type\":3,\"invocationId\":\"2\",\"result\":null}\x1e{\"type\":3,\"invocationId\":\"1\"}\x1e{\"type\":3,\"invocationId\":\"9\"}\x1e",
            &mut out,
            &mut res,
            true,
        );
        assert_eq!(out.iter().map(|o| o.0).collect::<Vec<_>>(), vec![3]);
        assert_eq!(res.anomalies.stray_completions, 1);
        assert_eq!(res.rtt_us.len(), 2);
        let mut none = VecDeque::new();
        let mut res = SendResult::new(1);
        sender_frame(
            b"{\"type\":3,\"invocationId\":\"0\"}\x1e",
            &mut none,
            &mut res,
            false,
        );
        assert_eq!(res.anomalies.stray_completions, 1);
    }

    #[test]
    fn rng_is_uniform_enough_and_reproducible() {
        let mut a = sender_rng(42, 3);
        let mut b = sender_rng(42, 3);
        let mut counts = [0u32; 10];
        for _ in 0..100_000 {
            let x = a.below(10);
            assert_eq!(x, b.below(10));
            counts[x] += 1;
        }
        for c in counts {
            assert!((9_000..11_000).contains(&c), "{counts:?}");
        }
        assert_ne!(sender_rng(42, 3).next(), sender_rng(42, 4).next());
    }
}
