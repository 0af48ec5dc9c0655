//! Statistics and the report: percentiles, the connect and anomaly sections, and the whole
//! report of a traffic run, printed and (with `--json`) as one JSON object.

use serde_json::{Value, json};

use crate::Args;
use crate::connect::Opened;
use crate::counters::{Anomalies, Deliveries, SendResult};
use crate::sample::{CpuSample, cpu_pct};

/// The `q` quantile (0..=1) of `sorted`, by the nearest-rank method; 0 if it is empty.
pub(crate) fn percentile(sorted: &[u32], q: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Bytes to MiB.
pub(crate) fn mib(b: u64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

/// The JSON section of a batch of `attempted` connections.
pub(crate) fn connect_json(o: &Opened, attempted: usize) -> Value {
    let ok = o.conns.iter().filter(|c| c.is_some()).count();
    json!({
        "attempted": attempted,
        "ok": ok,
        "failed": attempted - ok,
        "failures": o.failures,
        "failure_samples": o.failure_samples,
        "seconds": o.elapsed.as_secs_f64(),
        "per_second": if o.elapsed.as_secs_f64() > 0.0 { ok as f64 / o.elapsed.as_secs_f64() } else { 0.0 },
        "each_us": { "p50": o.each_us.0, "p99": o.each_us.1, "max": o.each_us.2 },
        "loadgen_cpu_pct": o.cpu_pct.0,
        "server_cpu_pct": o.cpu_pct.1,
    })
}

/// The JSON section of the anomalies.
pub(crate) fn anomalies_json(a: &Anomalies) -> Value {
    json!({
        "total": a.errors(),
        "show_error_message": a.show_error,
        "close_records": a.close_records,
        "completion_errors": a.completion_errors,
        "stray_completions": a.stray_completions,
        "missing_completions": a.missing_completions,
        "misrouted": a.misrouted,
        "unknown_records": a.unknown_records,
        "binary_frames": a.binary_frames,
        "partial_frames": a.partial_frames,
        "unexpected_closes": a.unexpected_closes,
        "send_errors": a.send_errors,
        "samples": a.samples,
    })
}

/// Prints the anomalies: the total, each non-zero count, the examples.
pub(crate) fn print_anomalies(a: &Anomalies) {
    println!("errors             {}", a.errors());
    let rows = [
        ("showErrorMessage", a.show_error),
        ("Close records", a.close_records),
        ("error Completions", a.completion_errors),
        ("stray Completions", a.stray_completions),
        ("missing Completions", a.missing_completions),
        ("misrouted", a.misrouted),
        ("unknown records", a.unknown_records),
        ("binary frames", a.binary_frames),
        ("partial frames", a.partial_frames),
        ("unexpected closes", a.unexpected_closes),
        ("send errors", a.send_errors),
    ];
    for (name, n) in rows {
        if n > 0 {
            println!("  {name:<17}{n}");
        }
    }
    for s in &a.samples {
        println!("  e.g. {s}");
    }
}

/// Prints a batch of `attempted` connections under `label`.
pub(crate) fn print_connect(label: &str, o: &Opened, attempted: usize) {
    let ok = o.conns.iter().filter(|c| c.is_some()).count();
    let secs = o.elapsed.as_secs_f64();
    let cpu = |p: Option<f64>| p.map(|p| format!("{p:.0} %")).unwrap_or_else(|| "?".into());
    println!(
        "{label:<19}{ok}/{attempted} in {:.3} s ({:.0}/s; CPU loadgen {}, server {})",
        secs,
        if secs > 0.0 { ok as f64 / secs } else { 0.0 },
        cpu(o.cpu_pct.0),
        cpu(o.cpu_pct.1),
    );
    println!(
        "  each connection  p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms{}",
        f64::from(o.each_us.0) / 1e3,
        f64::from(o.each_us.1) / 1e3,
        f64::from(o.each_us.2) / 1e3,
        if o.each_us.2 >= 1_000_000 {
            " (≥ 1 s: a SYN retransmit? check the server's listen backlog)"
        } else {
            ""
        }
    );
    for (k, n) in &o.failures {
        println!("  failed: {k} × {n}");
    }
    for s in &o.failure_samples {
        println!("  e.g. {s}");
    }
}

/// Everything a traffic run measured, for its report.
pub(crate) struct TrafficRun {
    /// [`connect_json`] of the receivers and of the senders.
    pub(crate) connect: (Value, Value),
    /// Connections that opened, receivers and senders together.
    pub(crate) connected: usize,
    /// Connections that could not be opened.
    pub(crate) connect_failed: usize,
    /// What the senders sent (round trips sorted); its anomalies are in `anomalies`.
    pub(crate) sent: SendResult,
    /// What the receivers got (latencies sorted).
    pub(crate) received: Deliveries,
    /// Deliveries the measured messages should have made.
    pub(crate) expected: u64,
    /// Anomalies of all connections.
    pub(crate) anomalies: Anomalies,
    /// Start of the measured window, nanoseconds since the epoch.
    pub(crate) measure_ns: u64,
    /// End of the measured window (earlier after Ctrl-C).
    pub(crate) window_end_ns: u64,
    /// When the last sender was done.
    pub(crate) senders_done_ns: u64,
    /// When the drain ended.
    pub(crate) drained_ns: u64,
    /// CPU samples at the start and the end of the measured window.
    pub(crate) cpu: (CpuSample, CpuSample),
    /// Server RSS before connecting, after connecting and at the end.
    pub(crate) rss: (Option<u64>, Option<u64>, Option<u64>),
    /// Whether Ctrl-C cut the run short.
    pub(crate) aborted: bool,
}

/// The figures the traffic report derives from a [`TrafficRun`].
struct TrafficStats {
    /// `open` or `closed`.
    mode: &'static str,
    /// Closed loop: invocations in flight per sender.
    window: usize,
    /// Length of the measured window, seconds.
    window_s: f64,
    /// Measured messages per second.
    achieved: f64,
    /// Measured deliveries per second.
    delivered: f64,
    /// Mean delivery latency, µs.
    mean_us: f64,
    /// Delivery latency, µs: p50, p90, p99, p99.9, max.
    latency: (u32, u32, u32, u32, u32),
    /// Closed loop: invocation → Completion round trip, µs: p50, p99, max.
    rtt: (u32, u32, u32),
    /// Server CPU during the measured window, % of one core.
    server_cpu_pct: Option<f64>,
    /// This process's CPU during the measured window, % of one core.
    own_cpu_pct: Option<f64>,
    /// Everything else that ran on the machine meanwhile (noise), % of one core.
    other_cpu_pct: Option<f64>,
    /// Server CPU time per measured delivery, µs.
    server_us_per_delivery: Option<f64>,
    /// Server RSS growth while connecting, per connection, bytes.
    rss_per_conn: Option<f64>,
}

impl TrafficStats {
    /// Derives the figures of `run`.
    fn new(args: &Args, run: &TrafficRun) -> Self {
        let window_s = (run.window_end_ns - run.measure_ns) as f64 / 1e9;
        let rate_of = |n: u64| {
            if window_s > 0.0 {
                n as f64 / window_s
            } else {
                0.0
            }
        };
        let delivered = rate_of(run.received.measured);
        let latencies = &run.received.latencies_us;
        let mean_us = if latencies.is_empty() {
            0.0
        } else {
            latencies.iter().map(|&l| f64::from(l)).sum::<f64>() / latencies.len() as f64
        };
        let rtt = &run.sent.rtt_us;
        let (cpu0, cpu1) = &run.cpu;
        let cpu_secs = cpu1.at.duration_since(cpu0.at).as_secs_f64();
        let server_cpu_pct = cpu_pct(cpu0, cpu1, |c| c.server_us);
        let own_cpu_pct = cpu_pct(cpu0, cpu1, |c| c.own_us);
        let other_cpu_pct = cpu_pct(cpu0, cpu1, |c| c.machine_us)
            .map(|m| (m - own_cpu_pct.unwrap_or(0.0) - server_cpu_pct.unwrap_or(0.0)).max(0.0));
        let deliveries_in_cpu_window = delivered * cpu_secs;
        let server_us_per_delivery = match (cpu0.server_us, cpu1.server_us) {
            (Some(a), Some(b)) if deliveries_in_cpu_window > 0.0 => {
                Some(b.saturating_sub(a) as f64 / deliveries_in_cpu_window)
            }
            _ => None,
        };
        let rss_per_conn = match (run.rss.0, run.rss.1) {
            (Some(b), Some(a)) if run.connected > 0 => {
                Some((a as f64 - b as f64) / run.connected as f64)
            }
            _ => None,
        };
        Self {
            mode: if args.rate.is_some() {
                "open"
            } else {
                "closed"
            },
            window: args.window.max(1),
            window_s,
            achieved: rate_of(run.sent.measured),
            delivered,
            mean_us,
            latency: (
                percentile(latencies, 0.50),
                percentile(latencies, 0.90),
                percentile(latencies, 0.99),
                percentile(latencies, 0.999),
                latencies.last().copied().unwrap_or(0),
            ),
            rtt: (
                percentile(rtt, 0.5),
                percentile(rtt, 0.99),
                rtt.last().copied().unwrap_or(0),
            ),
            server_cpu_pct,
            own_cpu_pct,
            other_cpu_pct,
            server_us_per_delivery,
            rss_per_conn,
        }
    }
}

/// Prints the report of a traffic run (and its JSON line with `--json`); returns whether the
/// run was clean.
pub(crate) fn traffic(args: &Args, run: &TrafficRun) -> bool {
    let stats = TrafficStats::new(args, run);
    print_traffic(args, run, &stats);
    if args.json {
        println!("{}", traffic_json(args, run, &stats));
    }
    run.connect_failed == 0
        && run.received.losses == 0
        && run.received.duplicates == 0
        && run.anomalies.errors() == 0
        && !run.aborted
        && run.sent.measured > 0
}

/// The printed report of a traffic run.
fn print_traffic(args: &Args, run: &TrafficRun, s: &TrafficStats) {
    let (users, per_user, nsend) = (args.users, args.connections, args.senders);
    let mode = s.mode;
    let sent = &run.sent;
    let (received, expected_total) = (run.received.measured, run.expected);
    let (losses, duplicates) = (run.received.losses, run.received.duplicates);
    let (achieved, delivered, mean_us) = (s.achieved, s.delivered, s.mean_us);
    let (p50, p90, p99, p999, max) = s.latency;
    let (rtt50, rtt99, rttmax) = s.rtt;
    let (rss_before, rss_connected, rss_end) = run.rss;
    println!(
        "mode               {mode} loop, {users} users × {per_user} connections, {nsend} senders, payload {} B{}",
        args.payload,
        if args.rate.is_none() {
            format!(", window {}", s.window)
        } else {
            String::new()
        }
    );
    if args.url.len() > 1 {
        println!("senders' URL       {}", args.sender_url());
        println!(
            "receivers' URLs    {} (round-robin)",
            args.receiver_urls().join(", ")
        );
    } else {
        println!("hub URL            {}", args.sender_url());
    }
    println!(
        "window             {:.3} s measured (warm-up {:.1} s), drain {:.3} s",
        s.window_s,
        args.warmup,
        run.drained_ns
            .saturating_sub(run.senders_done_ns.max(run.window_end_ns)) as f64
            / 1e9
    );
    match args.rate {
        Some(r) => println!("offered            {r:.0} msgs/s"),
        None => println!("offered            closed loop (= achieved)"),
    }
    println!(
        "achieved           {achieved:.0} msgs/s ({} messages)",
        sent.measured
    );
    println!(
        "delivered          {delivered:.0} deliveries/s ({received} of {expected_total} expected)"
    );
    println!(
        "losses             {losses}{}",
        if duplicates > 0 {
            format!(", duplicates {duplicates}")
        } else {
            String::new()
        }
    );
    println!(
        "latency µs         p50 {p50}  p90 {p90}  p99 {p99}  p99.9 {p999}  max {max}  mean {mean_us:.0}  (n={})",
        run.received.latencies_us.len()
    );
    if args.rate.is_none() {
        println!(
            "completion RTT µs  p50 {rtt50}  p99 {rtt99}  max {rttmax}  (invocation → Completion, n={})",
            sent.rtt_us.len()
        );
    }
    if args.rate.is_some() {
        println!(
            "schedule lag       max {:.3} ms, {} sends > 1 ms late",
            sent.max_lag_ns as f64 / 1e6,
            sent.late_1ms
        );
    }
    if let Some(p) = s.own_cpu_pct {
        println!("loadgen CPU        {p:.0} % of a core");
    }
    if let Some(p) = s.server_cpu_pct {
        println!(
            "server CPU         {p:.0} % of a core{}",
            s.server_us_per_delivery
                .map(|u| format!(", {u:.2} µs per delivery"))
                .unwrap_or_default()
        );
    }
    if let Some(p) = s.other_cpu_pct {
        println!("other CPU          {p:.0} % of a core (other processes on the machine)");
    }
    if let (Some(b), Some(a)) = (rss_before, rss_connected) {
        println!(
            "server RSS         {:.1} → {:.1} MiB after connecting ({:.0} B per connection){}",
            mib(b),
            mib(a),
            s.rss_per_conn.unwrap_or(0.0),
            rss_end
                .map(|e| format!(", {:.1} MiB at the end", mib(e)))
                .unwrap_or_default()
        );
    }
    print_anomalies(&run.anomalies);
    if run.aborted {
        println!("(interrupted)");
    }
}

/// The JSON report of a traffic run.
fn traffic_json(args: &Args, run: &TrafficRun, s: &TrafficStats) -> Value {
    let sent = &run.sent;
    let latencies = &run.received.latencies_us;
    let (p50, p90, p99, p999, max) = s.latency;
    let (rtt50, rtt99, rttmax) = s.rtt;
    let (rss_before, rss_connected, rss_end) = run.rss;
    json!({
        "mode": s.mode,
        "urls": { "senders": args.sender_url(), "receivers": args.receiver_urls() },
        "users": args.users,
        "connections_per_user": args.connections,
        "senders": args.senders,
        "payload_bytes": args.payload,
        "window": if args.rate.is_none() { Some(s.window) } else { None },
        "connect": { "receivers": run.connect.0, "senders": run.connect.1 },
        "measured_seconds": s.window_s,
        "warmup_seconds": args.warmup,
        "offered_msgs_per_s": args.rate,
        "achieved_msgs_per_s": s.achieved,
        "delivered_per_s": s.delivered,
        "messages": sent.measured,
        "warmup_messages": sent.warmup,
        "warmup_deliveries": run.received.warmup,
        "expected_deliveries": run.expected,
        "received_deliveries": run.received.measured,
        "losses": run.received.losses,
        "duplicates": run.received.duplicates,
        "latency_us": {
            "p50": p50, "p90": p90, "p99": p99, "p999": p999, "max": max,
            "mean": s.mean_us, "samples": latencies.len(),
        },
        "completion_rtt_us": if args.rate.is_none() {
            Some(json!({ "p50": rtt50, "p99": rtt99, "max": rttmax, "samples": sent.rtt_us.len() }))
        } else { None },
        "schedule_max_lag_us": args.rate.map(|_| sent.max_lag_ns / 1000),
        "schedule_late_1ms": args.rate.map(|_| sent.late_1ms),
        "loadgen_cpu_pct": s.own_cpu_pct,
        "server_cpu_pct": s.server_cpu_pct,
        "server_cpu_us_per_delivery": s.server_us_per_delivery,
        "other_cpu_pct": s.other_cpu_pct,
        "server_rss_bytes": { "before": rss_before, "connected": rss_connected, "end": rss_end },
        "server_bytes_per_connection": s.rss_per_conn,
        "errors": anomalies_json(&run.anomalies),
        "interrupted": run.aborted,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles() {
        let v: Vec<u32> = (1..=1000).collect();
        assert_eq!(percentile(&v, 0.5), 500);
        assert_eq!(percentile(&v, 0.99), 990);
        assert_eq!(percentile(&v, 0.999), 999);
        assert_eq!(percentile(&v, 1.0), 1000);
        assert_eq!(percentile(&[], 0.5), 0);
    }
}
