//! Traffic mode: receiver users with their connections, and senders that address them at
//! random, in closed loop or (with `--rate`) open loop. A run goes through its phases in
//! order: check the arguments, connect, start the receivers and senders, run the warm-up
//! and the measured window, let the senders finish, drain the outstanding deliveries,
//! collect the results, report.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::bail;
use futures_util::StreamExt as _;
use serde_json::Value;
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

use crate::connect::{Conn, ConnectCfg, Plan, Tokens, open_all, shared_urls};
use crate::counters::{Anomalies, Deliveries, Live, RecvResult, SendResult};
use crate::receivers::receiver;
use crate::report::{self, TrafficRun, connect_json, print_connect};
use crate::sample::{CpuSample, cpu_sample, rss_bytes};
use crate::senders::{
    PacedSender, Sched, SendCfg, Sink, Stream, closed_sender, pacer, sender_frame, sender_reader,
};
use crate::util::{instant_at, now_ns, receiver_name, secs_to_ns, sender_name};
use crate::wire::{FrameBuilder, MIN_PAYLOAD};
use crate::{Args, Outcome};

/// Runs traffic mode and reports it.
pub(crate) async fn run_traffic(args: &Args) -> anyhow::Result<Outcome> {
    check_args(args)?;
    let connected = connect(args).await?;
    let cfg = Arc::new(SendCfg {
        users: args.users,
        window: args.window.max(1),
        seed: args.seed,
        spin_ns: args.spin_us.saturating_mul(1000),
        frames: FrameBuilder::new(args.payload),
    });
    let sched = Arc::new(schedule(args));
    let (stop_tx, stop_rx) = watch::channel(false);
    let receivers = start_receivers(connected.receivers, args, &stop_rx);
    let senders = start_senders(connected.senders, args, &cfg, &sched, &stop_rx);
    let window = run_window(&sched, args.server_pid).await;
    let (mut sent, sinks) = finish_senders(senders.closed, senders.pacers, args.users).await;
    let senders_done_ns = now_ns();
    let expected = expected_deliveries(&sent, &receivers.live_conns);
    drain(&receivers.live, expected, &sched).await;
    let drained_ns = now_ns();
    let _ = stop_tx.send(true);
    let aborted = window.interrupt.finish();
    let mut anomalies = std::mem::take(&mut sent.anomalies);
    let mut received = collect_receivers(receivers.tasks, &sent, &mut anomalies).await;
    close_senders(senders.readers, sinks, &mut anomalies).await;
    let rss_end = args.server_pid.and_then(rss_bytes);
    received.latencies_us.sort_unstable();
    sent.rtt_us.sort_unstable();
    let clean = report::traffic(
        args,
        &TrafficRun {
            connect: connected.json,
            connected: connected.ok,
            connect_failed: connected.failed,
            sent,
            received,
            expected,
            anomalies,
            measure_ns: sched.measure_ns,
            window_end_ns: window.end_ns,
            senders_done_ns,
            drained_ns,
            cpu: window.cpu,
            rss: (connected.rss_before, connected.rss_connected, rss_end),
            aborted,
        },
    );
    Ok(Outcome { clean })
}

/// Refuses arguments a traffic run cannot work with.
fn check_args(args: &Args) -> anyhow::Result<()> {
    if args.users == 0 || args.connections == 0 || args.senders == 0 {
        bail!("--users, --connections and --senders must be at least 1");
    }
    if let Some(r) = args.rate
        && !(r.is_finite() && r > 0.0)
    {
        bail!("--rate must be a positive number of messages per second");
    }
    if args.payload < MIN_PAYLOAD {
        bail!("--payload must be at least {MIN_PAYLOAD} bytes (it carries the measurement header)");
    }
    Ok(())
}

/// The connections of a run, once opened.
struct Connected {
    /// Receiver connections, `--connections` per user in user order; `None` where one failed.
    receivers: Vec<Option<Conn>>,
    /// Sender connections in sender order; `None` where one failed.
    senders: Vec<Option<Conn>>,
    /// The connect sections of the JSON report: receivers, senders.
    json: (Value, Value),
    /// Connections that opened.
    ok: usize,
    /// Connections that could not be opened.
    failed: usize,
    /// Server RSS before connecting.
    rss_before: Option<u64>,
    /// Server RSS after connecting.
    rss_connected: Option<u64>,
}

/// Mints the tokens, opens the receivers' and then the senders' connections, and prints how
/// that went. Fails if no receiver or no sender could connect.
async fn connect(args: &Args) -> anyhow::Result<Connected> {
    let (users, per_user, nsend) = (args.users, args.connections, args.senders);
    let tokens = Tokens::new(&args.jwt_secret, Duration::from_secs(args.token_ttl))?;
    let recv_urls = shared_urls(args.receiver_urls());
    let send_url: Arc<str> = Arc::from(args.sender_url());
    let mut recv_plans = Vec::with_capacity(users * per_user);
    for u in 0..users {
        let t = tokens.issue(&receiver_name(u))?;
        for _ in 0..per_user {
            let url = recv_urls[recv_plans.len() % recv_urls.len()].clone();
            recv_plans.push(Plan {
                url,
                token: t.clone(),
            });
        }
    }
    let mut send_plans = Vec::with_capacity(nsend);
    for i in 0..nsend {
        send_plans.push(Plan {
            url: send_url.clone(),
            token: tokens.issue(&sender_name(i))?,
        });
    }
    let pid = args.server_pid;
    let ccfg = ConnectCfg::new(args);
    let rss_before = pid.and_then(rss_bytes);
    let recv_open = open_all(&ccfg, recv_plans, args.connect_concurrency, pid).await;
    let send_open = open_all(&ccfg, send_plans, args.connect_concurrency, pid).await;
    let rss_connected = pid.and_then(rss_bytes);
    print_connect("connect receivers", &recv_open, users * per_user);
    print_connect("connect senders", &send_open, nsend);
    let recv_connect = connect_json(&recv_open, users * per_user);
    let send_connect = connect_json(&send_open, nsend);
    let recv_ok = recv_open.conns.iter().filter(|c| c.is_some()).count();
    let send_ok = send_open.conns.iter().filter(|c| c.is_some()).count();
    if recv_ok == 0 || send_ok == 0 {
        bail!("no receiver or no sender could connect");
    }
    Ok(Connected {
        receivers: recv_open.conns,
        senders: send_open.conns,
        json: (recv_connect, send_connect),
        ok: recv_ok + send_ok,
        failed: users * per_user - recv_ok + nsend - send_ok,
        rss_before,
        rss_connected,
    })
}

/// The run's times: start 100 ms from now, then the warm-up, the measured window and the
/// drain.
fn schedule(args: &Args) -> Sched {
    let start_ns = now_ns() + 100_000_000;
    let measure_ns = start_ns + secs_to_ns(args.warmup);
    let end_ns = measure_ns + secs_to_ns(args.duration).max(1);
    Sched {
        start_ns,
        measure_ns,
        end_ns: AtomicU64::new(end_ns),
        drain_deadline_ns: AtomicU64::new(end_ns + secs_to_ns(args.drain)),
    }
}

/// The receivers of a run, reading.
struct Receivers {
    /// One task per receiver connection.
    tasks: JoinSet<RecvResult>,
    /// Their running count of measured deliveries.
    live: Arc<Live>,
    /// Connections that opened, per receiver user.
    live_conns: Vec<u64>,
}

/// Starts a reading task for every receiver connection that opened.
fn start_receivers(
    conns: Vec<Option<Conn>>,
    args: &Args,
    stop: &watch::Receiver<bool>,
) -> Receivers {
    let live = Arc::new(Live::default());
    let mut tasks = JoinSet::new();
    let mut live_conns = vec![0u64; args.users];
    for (i, c) in conns.into_iter().enumerate() {
        if let Some(c) = c {
            let user = i / args.connections;
            live_conns[user] += 1;
            tasks.spawn(receiver(c, user, live.clone(), stop.clone()));
        }
    }
    Receivers {
        tasks,
        live,
        live_conns,
    }
}

/// The senders of a run, sending.
struct Senders {
    /// Closed loop: one task per sender connection.
    closed: JoinSet<SendResult>,
    /// Open loop: one pacer per worker thread, each driving its share of the senders.
    pacers: JoinSet<(SendResult, Vec<(usize, Sink)>)>,
    /// Open loop: the read side of each sender connection.
    readers: JoinSet<(usize, Option<Stream>, Anomalies)>,
}

/// Starts the senders that connected: closed-loop senders, or (with `--rate`) the pacers and
/// the senders' readers.
fn start_senders(
    conns: Vec<Option<Conn>>,
    args: &Args,
    cfg: &Arc<SendCfg>,
    sched: &Arc<Sched>,
    stop: &watch::Receiver<bool>,
) -> Senders {
    let mut senders = Senders {
        closed: JoinSet::new(),
        pacers: JoinSet::new(),
        readers: JoinSet::new(),
    };
    match args.rate {
        None => {
            for (i, c) in conns.into_iter().enumerate() {
                if let Some(c) = c {
                    senders
                        .closed
                        .spawn(closed_sender(c, i, cfg.clone(), sched.clone()));
                }
            }
        }
        Some(rate) => {
            let nsend = args.senders;
            let npacers = args.threads.clamp(1, nsend);
            let mut groups: Vec<Vec<PacedSender>> = (0..npacers).map(|_| Vec::new()).collect();
            let mut early = Anomalies::default();
            for (i, c) in conns.into_iter().enumerate() {
                let Some(Conn { ws, leftover }) = c else {
                    continue;
                };
                if let Some(l) = leftover {
                    let mut r = SendResult::new(0);
                    sender_frame(&l, &mut VecDeque::new(), &mut r, false);
                    early.merge(r.anomalies);
                }
                let (sink, stream) = ws.split();
                senders
                    .readers
                    .spawn(sender_reader(i, stream, stop.clone()));
                groups[i % npacers].push(PacedSender::new(i, sink, args.seed));
            }
            for g in groups {
                senders
                    .pacers
                    .spawn(pacer(g, nsend, rate, cfg.clone(), sched.clone()));
            }
            if early.errors() > 0 {
                senders
                    .readers
                    .spawn(async move { (usize::MAX, None, early) });
            }
        }
    }
    senders
}

/// Ctrl-C during a run: it pulls the end of the window (and the drain deadline) in.
struct Interrupt {
    /// Turns true on Ctrl-C.
    rx: watch::Receiver<bool>,
    /// Waits for Ctrl-C.
    task: JoinHandle<()>,
}

impl Interrupt {
    /// Watches for Ctrl-C, which moves the end of `sched`'s window to now (but not before the
    /// warm-up ends) and its drain deadline to 2 s from now.
    fn watch(sched: &Arc<Sched>) -> Self {
        let (abort_tx, rx) = watch::channel(false);
        let sched = sched.clone();
        let task = tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                let now = now_ns();
                sched
                    .end_ns
                    .fetch_min(now.max(sched.measure_ns), Ordering::Relaxed);
                sched
                    .drain_deadline_ns
                    .fetch_min(now + 2_000_000_000, Ordering::Relaxed);
                let _ = abort_tx.send(true);
            }
            // Keep the sender alive: a closed channel would end every wait at once.
            std::future::pending::<()>().await;
            drop(abort_tx);
        });
        Self { rx, task }
    }

    /// Stops watching; returns whether Ctrl-C came.
    fn finish(self) -> bool {
        self.task.abort();
        *self.rx.borrow()
    }
}

/// The measured window, as it went.
struct Window {
    /// CPU samples at its start and its end.
    cpu: (CpuSample, CpuSample),
    /// Its end (earlier after Ctrl-C), nanoseconds since the epoch.
    end_ns: u64,
    /// The Ctrl-C watch, still running through the drain.
    interrupt: Interrupt,
}

/// Waits through the warm-up and the measured window (cut short by Ctrl-C), sampling CPU
/// times at the window's start and end.
async fn run_window(sched: &Arc<Sched>, server_pid: Option<u32>) -> Window {
    let mut interrupt = Interrupt::watch(sched);
    let wait_until = async |ns: u64, abort_rx: &mut watch::Receiver<bool>| {
        tokio::select! {
            _ = tokio::time::sleep_until(instant_at(ns)) => {}
            _ = abort_rx.changed() => {}
        }
    };
    wait_until(sched.measure_ns, &mut interrupt.rx).await;
    let cpu0 = cpu_sample(server_pid);
    wait_until(sched.end(), &mut interrupt.rx).await;
    let cpu1 = cpu_sample(server_pid);
    let end_ns = sched.end().min(now_ns()).max(sched.measure_ns);
    Window {
        cpu: (cpu0, cpu1),
        end_ns,
        interrupt,
    }
}

/// Waits for the senders to finish: pacers at the end of the window, closed-loop senders
/// once their Completions are in (or at the drain deadline). Returns what they sent, with
/// their anomalies, and the open-loop senders' write halves by sender index.
async fn finish_senders(
    mut closed: JoinSet<SendResult>,
    mut pacers: JoinSet<(SendResult, Vec<(usize, Sink)>)>,
    users: usize,
) -> (SendResult, BTreeMap<usize, Sink>) {
    let mut sent = SendResult::new(users);
    let mut sinks = BTreeMap::new();
    while let Some(r) = closed.join_next().await {
        if let Ok(r) = r {
            sent.merge(r);
        }
    }
    while let Some(r) = pacers.join_next().await {
        if let Ok((r, s)) = r {
            sent.merge(r);
            sinks.extend(s);
        }
    }
    (sent, sinks)
}

/// Deliveries the measured messages should make: each one to every live connection of its
/// target user.
fn expected_deliveries(sent: &SendResult, live_conns: &[u64]) -> u64 {
    sent.per_target
        .iter()
        .zip(live_conns)
        .map(|(&m, &c)| u64::from(m) * c)
        .sum()
}

/// Waits for the deliveries still on their way: until all `expected` have arrived or the
/// drain deadline passes.
async fn drain(live: &Live, expected: u64, sched: &Sched) {
    let drain_deadline = sched.drain_deadline_ns.load(Ordering::Relaxed);
    loop {
        if live.measured_deliveries.load(Ordering::Relaxed) >= expected {
            break;
        }
        if now_ns()
            >= sched
                .drain_deadline_ns
                .load(Ordering::Relaxed)
                .min(drain_deadline)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Collects the stopped receivers' results: deliveries against what `sent` addressed to
/// their users, and their anomalies into `anomalies`.
async fn collect_receivers(
    mut tasks: JoinSet<RecvResult>,
    sent: &SendResult,
    anomalies: &mut Anomalies,
) -> Deliveries {
    let mut d = Deliveries::default();
    while let Some(r) = tasks.join_next().await {
        let Ok(r) = r else { continue };
        let expected = u64::from(sent.per_target[r.user]);
        d.losses += expected.saturating_sub(r.measured);
        d.duplicates += r.measured.saturating_sub(expected);
        d.measured += r.measured;
        d.warmup += r.warmup;
        anomalies.merge(r.anomalies);
        if d.latencies_us.is_empty() {
            d.latencies_us = r.latencies_us;
        } else {
            d.latencies_us.extend_from_slice(&r.latencies_us);
        }
    }
    d
}

/// Open loop: collects the stopped readers' anomalies into `anomalies` and closes every
/// sender connection whose both halves are still there.
async fn close_senders(
    mut readers: JoinSet<(usize, Option<Stream>, Anomalies)>,
    mut sinks: BTreeMap<usize, Sink>,
    anomalies: &mut Anomalies,
) {
    let mut closers = JoinSet::new();
    while let Some(r) = readers.join_next().await {
        let Ok((idx, stream, an)) = r else { continue };
        anomalies.merge(an);
        if let (Some(stream), Some(sink)) = (stream, sinks.remove(&idx))
            && let Ok(mut ws) = sink.reunite(stream)
        {
            closers.spawn(async move {
                let _ = tokio::time::timeout(Duration::from_secs(1), ws.close(None)).await;
            });
        }
    }
    while closers.join_next().await.is_some() {}
}
