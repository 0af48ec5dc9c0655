//! Idle mode (`--idle N`): open N connections, hold them, and report the server's resident
//! memory per connection.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::connect::{ConnectCfg, Plan, Tokens, open_all, shared_urls};
use crate::counters::{Anomalies, Live};
use crate::receivers::receiver;
use crate::report::{anomalies_json, connect_json, mib, print_anomalies, print_connect};
use crate::sample::rss_bytes;
use crate::util::receiver_name;
use crate::{Args, Outcome};

/// Runs idle mode with `n` connections, `--connections` per user.
pub(crate) async fn run_idle(args: &Args, n: usize) -> anyhow::Result<Outcome> {
    let per_user = args.connections.max(1);
    let tokens = Tokens::new(&args.jwt_secret, Duration::from_secs(args.token_ttl))?;
    let users = n.div_ceil(per_user);
    let mut user_tokens = Vec::with_capacity(users);
    for u in 0..users {
        user_tokens.push(tokens.issue(&receiver_name(u))?);
    }
    let urls = shared_urls(&args.url);
    let plans: Vec<Plan> = (0..n)
        .map(|i| Plan {
            url: urls[i % urls.len()].clone(),
            token: user_tokens[i / per_user].clone(),
        })
        .collect();
    let pid = args.server_pid;
    let rss_before = pid.and_then(rss_bytes);
    let opened = open_all(&ConnectCfg::new(args), plans, args.connect_concurrency, pid).await;
    let rss_connected = pid.and_then(rss_bytes);
    let connect = connect_json(&opened, n);
    let failed = n - opened.conns.iter().filter(|c| c.is_some()).count();
    print_connect("connect", &opened, n);

    let live = Arc::new(Live::default());
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut set = JoinSet::new();
    let mut ok = 0usize;
    for (i, c) in opened.conns.into_iter().enumerate() {
        if let Some(c) = c {
            ok += 1;
            set.spawn(receiver(c, i / per_user, live.clone(), stop_rx.clone()));
        }
    }
    let aborted = tokio::select! {
        _ = tokio::time::sleep(Duration::from_secs_f64(args.settle.max(0.0))) => false,
        _ = tokio::signal::ctrl_c() => true,
    };
    let rss_settled = pid.and_then(rss_bytes);
    let aborted = aborted
        || tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs_f64(args.duration.max(0.0))) => false,
            _ = tokio::signal::ctrl_c() => true,
        };
    let rss_end = pid.and_then(rss_bytes);
    let _ = stop_tx.send(true);
    let mut an = Anomalies::default();
    while let Some(r) = set.join_next().await {
        if let Ok(r) = r {
            an.merge(r.anomalies);
        }
    }
    let per_conn = |after: Option<u64>| -> Option<f64> {
        match (rss_before, after) {
            (Some(b), Some(a)) if ok > 0 => Some((a as f64 - b as f64) / ok as f64),
            _ => None,
        }
    };
    println!(
        "mode               idle, {ok} connections ({per_user} per user), held {:.1} s",
        args.duration
    );
    println!("hub URLs           {}", args.url.join(", "));
    if let Some(b) = rss_before {
        println!("server RSS         before {:.1} MiB", mib(b));
        for (label, v) in [
            ("connected", rss_connected),
            ("settled", rss_settled),
            ("end", rss_end),
        ] {
            if let (Some(v), Some(pc)) = (v, per_conn(v)) {
                println!(
                    "  {label:<17}{:.1} MiB  → {:.0} B = {:.2} KiB per connection",
                    mib(v),
                    pc,
                    pc / 1024.0
                );
            }
        }
    }
    print_anomalies(&an);
    if aborted {
        println!("(interrupted)");
    }
    if args.json {
        let report = json!({
            "mode": "idle",
            "urls": args.url,
            "connections": ok,
            "connections_per_user": per_user,
            "connect": connect,
            "hold_seconds": args.duration,
            "server_rss_bytes": {
                "before": rss_before, "connected": rss_connected,
                "settled": rss_settled, "end": rss_end,
            },
            "server_bytes_per_connection": per_conn(rss_settled),
            "server_bytes_per_connection_end": per_conn(rss_end),
            "errors": anomalies_json(&an),
            "interrupted": aborted,
        });
        println!("{report}");
    }
    Ok(Outcome {
        clean: failed == 0 && an.errors() == 0 && !aborted,
    })
}
