//! `switchboard-loadgen`: a load generator for a Switchboard hub.
//!
//! It speaks the ASP.NET Core SignalR JSON hub protocol over WebSockets with raw frames (no
//! SignalR client library), skipNegotiation style: one WebSocket per connection on the bare hub
//! URL, `Authorization: Bearer <token>` on the upgrade, then the `{"protocol":"json","version":1}`
//! handshake.
//!
//! # Workload
//!
//! * `--users U` receiver users `user-0` … `user-{U-1}`, each with `--connections C` live
//!   connections. Receivers only read (and send a keep-alive Ping every 15 s).
//! * `--senders S` extra connections, one per separate user `sender-0` … `sender-{S-1}`.
//!   Senders are never addressed, so every `addChatMessage` a receiver gets is a measured
//!   delivery and sender sockets carry nothing but Completions.
//! * Every message is `SendChatMessage(<random user-N>, <payload>)`; targets come from a
//!   fixed-seed xorshift generator per sender (`--seed`). The hub must deliver it to all C
//!   connections of the target: expected deliveries = messages × C. Expectations are tracked
//!   per target user, so losses and duplicates on different connections cannot cancel out.
//! * The payload is exactly `--payload` bytes: `<m|w><target>.<seq>.<t>.` padded with `x`,
//!   where `m`/`w` marks measured/warm-up messages and `t` is the intended send time in
//!   nanoseconds since this process's start (a monotonic `Instant`). A receiver checks that
//!   the message was meant for its own user and records `receive time − t`.
//!
//! # Modes
//!
//! * Open loop (`--rate R`): a fixed schedule of R messages/s spread round-robin over the S
//!   senders (sender i sends at `i/R + k·S/R`). Latency is measured from the *intended* send
//!   time, so a sender (or server) that falls behind cannot hide its delay (no coordinated
//!   omission): late messages go out at once but keep their intended times. Invocations carry
//!   no `invocationId`, so the hub must answer nothing. To keep the schedule accurate below
//!   the 1 ms tokio timer resolution, the pacer yields in a loop (instead of sleeping) when the
//!   next message is due within `--spin-us`; this keeps the load generator's core busy.
//! * Closed loop (no `--rate`): every sender keeps `--window` invocations (with
//!   `invocationId`) in flight and sends the next one when a Completion comes back; the send
//!   time is the intended time.
//! * Idle (`--idle N`): N connections (users `user-{i / C}`), held for `--duration` seconds;
//!   with `--server-pid` reports the server's resident memory per connection.
//!
//! # Several nodes
//!
//! `--url` may be given more than once (or as a comma-separated list). With several URLs the
//! senders connect to the first and the receiver connections round-robin over the others
//! (connection k of user u goes to the `(u·C + k) mod (URLs − 1)`-th of them), so every
//! delivery crosses nodes and a user's connections sit on different nodes where there are
//! enough; idle connections round-robin over all URLs. With one URL every connection opens
//! it. The report names the URLs used.
//!
//! After the measured window (`--warmup` then `--duration` seconds) the senders stop, and the
//! generator waits up to `--drain` seconds for outstanding deliveries before it reports.
//!
//! # Exit status
//!
//! 0: clean run; 2: the run finished but saw failed connections, losses, duplicates, misrouted
//! messages or protocol errors; 1: it could not run at all.
//!
//! # Open files
//!
//! Each connection is a socket. The soft `RLIMIT_NOFILE` must exceed the connection count;
//! the generator checks `/proc/self/limits` and tells you to run `ulimit -n <hard limit>` if it
//! is too low (it does not change limits itself).
//!
//! # Modules
//!
//! | module | what |
//! |---|---|
//! | `main` | the command line and the exit status |
//! | `traffic` | traffic mode, phase by phase: connect, start, window, drain, collect |
//! | `idle` | idle mode: hold connections, measure the server's memory |
//! | `connect` | tokens, one connection's upgrade and handshake, opening many at once |
//! | `receivers` | receiver connections: check and time each delivery |
//! | `senders` | the schedule, closed-loop senders, open-loop pacers |
//! | `wire` | the frames sent, the classification of the records received |
//! | `counters` | anomalies and the per-connection results |
//! | `sample` | `/proc`: memory, CPU time, open-files limit |
//! | `report` | percentiles, the printed and JSON reports |
//! | `util` | the clock, the random generator, user names |

#![allow(clippy::print_stdout)]

mod connect;
mod counters;
mod idle;
mod receivers;
mod report;
mod sample;
mod senders;
mod traffic;
mod util;
mod wire;

use std::time::Duration;

use clap::Parser;

/// Load generator for a Switchboard (SignalR JSON hub protocol) server.
#[derive(Parser, Debug, Clone)]
#[command(
    name = "switchboard-loadgen",
    version,
    about = "Load generator for a Switchboard hub: delivered messages/s, latency percentiles, losses and server memory"
)]
struct Args {
    /// Hub URL (WebSocket, no negotiate). Repeat it (or separate URLs with commas) to spread
    /// the connections over several nodes: senders connect to the first URL and receivers
    /// round-robin over the others, so every delivery crosses nodes; idle connections
    /// round-robin over all of them.
    #[arg(
        long,
        env = "SWITCHBOARD_LOADGEN_URL",
        default_value = "ws://127.0.0.1:5000/hubs/chat",
        value_delimiter = ','
    )]
    url: Vec<String>,
    /// HS256 secret the server verifies tokens with (at least 32 bytes).
    #[arg(long, env = "SWITCHBOARD_LOADGEN_JWT_SECRET", hide_env_values = true)]
    jwt_secret: String,
    /// Number of receiver users.
    #[arg(long, env = "SWITCHBOARD_LOADGEN_USERS", default_value_t = 1000)]
    users: usize,
    /// Connections per receiver user (and per user in --idle mode).
    #[arg(long, env = "SWITCHBOARD_LOADGEN_CONNECTIONS", default_value_t = 2)]
    connections: usize,
    /// Sender connections, one per separate user `sender-N` (never addressed).
    #[arg(long, env = "SWITCHBOARD_LOADGEN_SENDERS", default_value_t = 50)]
    senders: usize,
    /// Offered messages per second in total (open loop). Omit for closed loop.
    #[arg(long, env = "SWITCHBOARD_LOADGEN_RATE")]
    rate: Option<f64>,
    /// Closed loop: invocations in flight per sender.
    #[arg(long, env = "SWITCHBOARD_LOADGEN_WINDOW", default_value_t = 16)]
    window: usize,
    /// Measured window, seconds (in --idle mode: how long the connections are held).
    #[arg(long, env = "SWITCHBOARD_LOADGEN_DURATION", default_value_t = 10.0)]
    duration: f64,
    /// Warm-up before the measured window, seconds (messages sent then are not counted).
    #[arg(long, env = "SWITCHBOARD_LOADGEN_WARMUP", default_value_t = 1.0)]
    warmup: f64,
    /// How long to wait for outstanding deliveries after the window, seconds.
    #[arg(long, env = "SWITCHBOARD_LOADGEN_DRAIN", default_value_t = 2.0)]
    drain: f64,
    /// Payload size in bytes (the second SendChatMessage argument).
    #[arg(long, env = "SWITCHBOARD_LOADGEN_PAYLOAD", default_value_t = 64)]
    payload: usize,
    /// Idle mode: open this many connections, hold them, report server memory.
    #[arg(long, env = "SWITCHBOARD_LOADGEN_IDLE")]
    idle: Option<usize>,
    /// Idle mode: seconds to wait after connecting before the first memory sample.
    #[arg(long, env = "SWITCHBOARD_LOADGEN_SETTLE", default_value_t = 2.0)]
    settle: f64,
    /// Server process id: report its RSS per connection and its CPU use.
    #[arg(long, env = "SWITCHBOARD_LOADGEN_SERVER_PID")]
    server_pid: Option<u32>,
    /// Connections being opened at the same time.
    #[arg(
        long,
        env = "SWITCHBOARD_LOADGEN_CONNECT_CONCURRENCY",
        default_value_t = 256
    )]
    connect_concurrency: usize,
    /// Timeout for one connection's TCP connect + upgrade + handshake, seconds.
    #[arg(
        long,
        env = "SWITCHBOARD_LOADGEN_CONNECT_TIMEOUT",
        default_value_t = 10.0
    )]
    connect_timeout: f64,
    /// Tokio worker threads.
    #[arg(long, env = "SWITCHBOARD_LOADGEN_THREADS", default_value_t = 1)]
    threads: usize,
    /// Open loop: yield-spin instead of sleeping when the next message is due within this
    /// many microseconds (0: always sleep, 1 ms timer resolution).
    #[arg(long, env = "SWITCHBOARD_LOADGEN_SPIN_US", default_value_t = 2000)]
    spin_us: u64,
    /// WebSocket read buffer per connection, bytes.
    #[arg(long, env = "SWITCHBOARD_LOADGEN_READ_BUFFER", default_value_t = 8192)]
    read_buffer: usize,
    /// Seed of the target-choosing generators.
    #[arg(long, env = "SWITCHBOARD_LOADGEN_SEED", default_value_t = 42)]
    seed: u64,
    /// Lifetime of the minted tokens, seconds.
    #[arg(long, env = "SWITCHBOARD_LOADGEN_TOKEN_TTL", default_value_t = 3600)]
    token_ttl: u64,
    /// Also print the report as one JSON object on the last line.
    #[arg(long, env = "SWITCHBOARD_LOADGEN_JSON")]
    json: bool,
}

impl Args {
    /// The URL sender connections open: the first `--url`.
    fn sender_url(&self) -> &str {
        &self.url[0]
    }

    /// The URLs receiver connections open, round-robin: the only `--url`, or all but the
    /// first when there are several.
    fn receiver_urls(&self) -> &[String] {
        if self.url.len() > 1 {
            &self.url[1..]
        } else {
            &self.url
        }
    }
}

/// What a mode hands back to `main`: whether the run was clean.
struct Outcome {
    /// No failed connections, losses, duplicates, misrouted messages or protocol errors.
    clean: bool,
}

/// Parses the command line, checks the open-files limit, runs the mode and turns its
/// outcome into the exit status.
fn main() -> std::process::ExitCode {
    let args = Args::parse();
    if args.url.is_empty() || args.url.iter().any(String::is_empty) {
        eprintln!("switchboard-loadgen: --url must not be empty");
        return std::process::ExitCode::from(1);
    }
    util::epoch();
    let needed = match args.idle {
        Some(n) => n,
        None => args.users * args.connections + args.senders,
    };
    if let Err(e) = sample::check_nofile(needed) {
        eprintln!("switchboard-loadgen: {e:#}");
        return std::process::ExitCode::from(1);
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("switchboard-loadgen: cannot start the runtime: {e}");
            return std::process::ExitCode::from(1);
        }
    };
    let result = rt.block_on(async {
        match args.idle {
            Some(n) => idle::run_idle(&args, n).await,
            None => traffic::run_traffic(&args).await,
        }
    });
    // Do not wait for stragglers (e.g. connections still closing).
    rt.shutdown_timeout(Duration::from_millis(500));
    match result {
        Ok(o) if o.clean => std::process::ExitCode::SUCCESS,
        Ok(_) => std::process::ExitCode::from(2),
        Err(e) => {
            eprintln!("switchboard-loadgen: {e:#}");
            std::process::ExitCode::from(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(extra: &[&str]) -> Args {
        let mut argv = vec!["switchboard-loadgen", "--jwt-secret", "s"];
        argv.extend_from_slice(extra);
        Args::try_parse_from(argv).expect("arguments parse")
    }

    #[test]
    fn one_url_serves_senders_and_receivers() {
        let args = parse(&["--url", "ws://a/hubs/chat"]);
        assert_eq!(args.sender_url(), "ws://a/hubs/chat");
        assert_eq!(args.receiver_urls(), ["ws://a/hubs/chat"]);
    }

    #[test]
    fn several_urls_put_senders_on_the_first_and_receivers_on_the_others() {
        for argv in [
            &["--url", "ws://a", "--url", "ws://b", "--url", "ws://c"][..],
            &["--url", "ws://a,ws://b,ws://c"][..],
        ] {
            let args = parse(argv);
            assert_eq!(args.sender_url(), "ws://a");
            assert_eq!(args.receiver_urls(), ["ws://b", "ws://c"]);
        }
    }
}
