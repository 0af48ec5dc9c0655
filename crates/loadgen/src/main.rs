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

#![allow(clippy::print_stdout)]

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::Parser;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt as _, StreamExt as _};
use serde_json::{Value, json};
use switchboard_core::UserId;
use tokio::net::TcpStream;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::http::header::AUTHORIZATION;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use switchboard::auth;

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Record separator ending every SignalR JSON record.
const RS: u8 = 0x1e;
const HANDSHAKE: &str = "{\"protocol\":\"json\",\"version\":1}\u{1e}";
const PING: Utf8Bytes = Utf8Bytes::from_static("{\"type\":6}\u{1e}");
/// Client keep-alive interval (the JS client's default).
const KEEPALIVE: Duration = Duration::from_secs(15);
/// Smallest payload that holds the embedded header for any realistic run.
const MIN_PAYLOAD: usize = 48;

/// Load generator for a Switchboard (SignalR JSON hub protocol) server.
#[derive(Parser, Debug, Clone)]
#[command(
    name = "switchboard-loadgen",
    version,
    about = "Load generator for a Switchboard hub: delivered messages/s, latency percentiles, losses and server memory"
)]
struct Args {
    /// Hub URL (WebSocket, no negotiate).
    #[arg(
        long,
        env = "SWITCHBOARD_LOADGEN_URL",
        default_value = "ws://127.0.0.1:5000/hubs/chat"
    )]
    url: String,
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

// ---------------------------------------------------------------------------------------------
// Time, randomness, small formatting helpers
// ---------------------------------------------------------------------------------------------

static EPOCH: OnceLock<Instant> = OnceLock::new();

fn epoch() -> Instant {
    *EPOCH.get_or_init(Instant::now)
}

/// Nanoseconds since this process's epoch.
fn now_ns() -> u64 {
    u64::try_from(epoch().elapsed().as_nanos()).unwrap_or(u64::MAX)
}

fn instant_at(ns: u64) -> tokio::time::Instant {
    tokio::time::Instant::from_std(epoch() + Duration::from_nanos(ns))
}

fn secs_to_ns(s: f64) -> u64 {
    (s.max(0.0) * 1e9) as u64
}

/// xorshift64*: small, fast, reproducible.
struct XorShift(u64);

impl XorShift {
    fn new(seed: u64) -> Self {
        // splitmix64 of the seed so that neighbouring seeds diverge; never zero.
        let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        Self(if z == 0 { 1 } else { z })
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `0..n` (n > 0), by multiply-shift.
    fn below(&mut self, n: usize) -> usize {
        ((u128::from(self.next()) * n as u128) >> 64) as usize
    }
}

fn push_u64(s: &mut String, mut v: u64) {
    let mut buf = [0u8; 20];
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    for &b in &buf[i..] {
        s.push(char::from(b));
    }
}

fn receiver_name(user: usize) -> String {
    format!("user-{user}")
}

fn sender_name(i: usize) -> String {
    format!("sender-{i}")
}

// ---------------------------------------------------------------------------------------------
// Outgoing frames
// ---------------------------------------------------------------------------------------------

/// Builds `SendChatMessage` invocation records with the embedded measurement header.
struct FrameBuilder {
    payload: usize,
    capacity: usize,
}

impl FrameBuilder {
    fn new(payload: usize) -> Self {
        Self {
            payload,
            capacity: payload + 128,
        }
    }

    /// `{"type":1[,"invocationId":"<id>"],"target":"SendChatMessage","arguments":["user-<t>","<payload>"]}␞`
    fn build(
        &self,
        target: usize,
        seq: u64,
        intended_ns: u64,
        measured: bool,
        invocation_id: Option<u64>,
    ) -> Utf8Bytes {
        let mut s = String::with_capacity(self.capacity);
        s.push_str("{\"type\":1,");
        if let Some(id) = invocation_id {
            s.push_str("\"invocationId\":\"");
            push_u64(&mut s, id);
            s.push_str("\",");
        }
        s.push_str("\"target\":\"SendChatMessage\",\"arguments\":[\"user-");
        push_u64(&mut s, target as u64);
        s.push_str("\",\"");
        let start = s.len();
        s.push(if measured { 'm' } else { 'w' });
        push_u64(&mut s, target as u64);
        s.push('.');
        push_u64(&mut s, seq);
        s.push('.');
        push_u64(&mut s, intended_ns);
        s.push('.');
        while s.len() - start < self.payload {
            s.push('x');
        }
        s.push_str("\"]}\u{1e}");
        Utf8Bytes::from(s)
    }
}

// ---------------------------------------------------------------------------------------------
// Incoming records
// ---------------------------------------------------------------------------------------------

/// The measurement header parsed out of a delivered payload.
#[derive(Debug, PartialEq, Eq)]
struct Embedded {
    measured: bool,
    target: u64,
    seq: u64,
    intended_ns: u64,
}

#[derive(Debug, PartialEq, Eq)]
enum Record {
    /// `addChatMessage` carrying one of our payloads.
    Chat(Embedded),
    Ping,
    /// Completion: invocation id (if numeric) and whether it carried an error.
    Completion {
        id: Option<u64>,
        error: bool,
    },
    /// Server Close record (`type 7`), with its error text if any.
    Close(Option<String>),
    /// `showErrorMessage` invocation, with its first argument.
    ShowError(String),
    /// Anything else: the raw text, for the report.
    Other(String),
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() || hay.len() < needle.len() {
        return None;
    }
    let first = needle[0];
    let last_start = hay.len() - needle.len();
    let mut i = 0;
    while i <= last_start {
        match hay[i..=last_start].iter().position(|&b| b == first) {
            None => return None,
            Some(p) => {
                i += p;
                if &hay[i..i + needle.len()] == needle {
                    return Some(i);
                }
                i += 1;
            }
        }
    }
    None
}

/// Parses `<digits><term>` at the start of `b`; returns the value and the rest after `term`.
fn parse_num(b: &[u8], term: u8) -> Option<(u64, &[u8])> {
    let mut v: u64 = 0;
    for (n, &c) in b.iter().enumerate() {
        if c == term {
            return if n == 0 { None } else { Some((v, &b[n + 1..])) };
        }
        if !c.is_ascii_digit() {
            return None;
        }
        v = v.checked_mul(10)?.checked_add(u64::from(c - b'0'))?;
    }
    None
}

/// Parses the header of a payload: `<m|w><target>.<seq>.<t>.` (anything may follow).
fn parse_embedded(p: &[u8]) -> Option<Embedded> {
    let (&flag, rest) = p.split_first()?;
    let measured = match flag {
        b'm' => true,
        b'w' => false,
        _ => return None,
    };
    let (target, rest) = parse_num(rest, b'.')?;
    let (seq, rest) = parse_num(rest, b'.')?;
    let (intended_ns, _) = parse_num(rest, b'.')?;
    Some(Embedded {
        measured,
        target,
        seq,
        intended_ns,
    })
}

/// Fast path for `{"type":1,"target":"addChatMessage","arguments":["<sender>: <payload>"]}`
/// in any property order: no JSON parse, just find the argument string.
fn fast_chat(rec: &[u8]) -> Option<Embedded> {
    const ARGS: &[u8] = b"\"arguments\":[\"";
    find(rec, b"\"addChatMessage\"")?;
    let at = find(rec, ARGS)? + ARGS.len();
    let arg = &rec[at..];
    let end = arg.iter().position(|&b| b == b'"' || b == b'\\')?;
    if arg[end] != b'"' {
        return None; // escapes: leave it to the slow path
    }
    let arg = &arg[..end];
    let colon = find(arg, b": ")?;
    parse_embedded(&arg[colon + 2..])
}

/// Fast path for `{"type":3,"invocationId":"<n>","result":null}` (any property order).
fn fast_completion(rec: &[u8]) -> Option<Record> {
    const ID: &[u8] = b"\"invocationId\":\"";
    find(rec, b"\"type\":3")?;
    let at = find(rec, ID)? + ID.len();
    let (id, _) = parse_num(&rec[at..], b'"')?;
    let error = find(rec, b"\"error\":").is_some();
    Some(Record::Completion {
        id: Some(id),
        error,
    })
}

fn classify(rec: &[u8]) -> Record {
    if rec == b"{\"type\":6}" {
        return Record::Ping;
    }
    if let Some(e) = fast_chat(rec) {
        return Record::Chat(e);
    }
    if let Some(c) = fast_completion(rec) {
        return c;
    }
    slow_classify(rec)
}

fn slow_classify(rec: &[u8]) -> Record {
    let text = || String::from_utf8_lossy(rec).into_owned();
    let Ok(v) = serde_json::from_slice::<Value>(rec) else {
        return Record::Other(text());
    };
    match v.get("type").and_then(Value::as_u64) {
        Some(1) => {
            let target = v.get("target").and_then(Value::as_str).unwrap_or_default();
            let first = v
                .get("arguments")
                .and_then(Value::as_array)
                .and_then(|a| a.first())
                .and_then(Value::as_str);
            if target.eq_ignore_ascii_case("addChatMessage")
                && let Some(arg) = first
                && let Some(colon) = arg.find(": ")
                && let Some(e) = parse_embedded(&arg.as_bytes()[colon + 2..])
            {
                return Record::Chat(e);
            }
            if target.eq_ignore_ascii_case("showErrorMessage") {
                return Record::ShowError(first.unwrap_or_default().to_owned());
            }
            Record::Other(text())
        }
        Some(3) => Record::Completion {
            id: v
                .get("invocationId")
                .and_then(Value::as_str)
                .and_then(|s| s.parse().ok()),
            error: v.get("error").is_some(),
        },
        Some(6) => Record::Ping,
        Some(7) => Record::Close(v.get("error").and_then(Value::as_str).map(str::to_owned)),
        _ => Record::Other(text()),
    }
}

/// Splits a text frame into records. Returns the records and whether the frame ended exactly
/// on a record boundary (the protocol requires it).
fn records(frame: &[u8]) -> (impl Iterator<Item = &[u8]>, bool) {
    let whole = frame.last() == Some(&RS);
    let body = if whole {
        &frame[..frame.len() - 1]
    } else {
        frame
    };
    let iter = body.split(|&b| b == RS).filter(|r| !r.is_empty());
    (iter, whole)
}

// ---------------------------------------------------------------------------------------------
// Counters
// ---------------------------------------------------------------------------------------------

/// Protocol-level observations, merged over all connections.
#[derive(Default, Debug, Clone)]
struct Anomalies {
    show_error: u64,
    close_records: u64,
    completion_errors: u64,
    /// Completions on a non-blocking invocation or for an unknown id.
    stray_completions: u64,
    /// Invocations with an id whose Completion never came.
    missing_completions: u64,
    /// Deliveries whose payload named another user.
    misrouted: u64,
    /// Records we could not make sense of.
    unknown_records: u64,
    binary_frames: u64,
    /// Text frames that did not end on a record separator.
    partial_frames: u64,
    /// Connections that ended before we stopped them (server close, EOF, error).
    unexpected_closes: u64,
    /// Send failures.
    send_errors: u64,
    /// Up to a few examples of what went wrong, for the report.
    samples: Vec<String>,
}

impl Anomalies {
    fn note(&mut self, s: impl Into<String>) {
        if self.samples.len() < 8 {
            self.samples.push(s.into());
        }
    }

    fn merge(&mut self, o: Anomalies) {
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

    fn errors(&self) -> u64 {
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
struct Live {
    measured_deliveries: AtomicU64,
}

struct RecvResult {
    user: usize,
    latencies_us: Vec<u32>,
    measured: u64,
    warmup: u64,
    anomalies: Anomalies,
}

struct SendResult {
    /// Measured messages per target user.
    per_target: Vec<u32>,
    /// Closed loop: invocation → Completion round trips, microseconds.
    rtt_us: Vec<u32>,
    measured: u64,
    warmup: u64,
    max_lag_ns: u64,
    late_1ms: u64,
    anomalies: Anomalies,
}

impl SendResult {
    fn new(users: usize) -> Self {
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
}

// ---------------------------------------------------------------------------------------------
// Connecting
// ---------------------------------------------------------------------------------------------

#[derive(Debug, thiserror::Error)]
enum ConnectError {
    #[error("HTTP {0}")]
    Http(u16),
    #[error("handshake refused: {0}")]
    Refused(String),
    #[error("handshake: {0}")]
    Handshake(String),
    #[error("timed out")]
    Timeout,
    #[error("{0}")]
    Transport(String),
}

impl ConnectError {
    fn kind(&self) -> String {
        match self {
            Self::Http(code) => format!("http_{code}"),
            Self::Refused(_) => "handshake_refused".into(),
            Self::Handshake(_) => "handshake_error".into(),
            Self::Timeout => "timeout".into(),
            Self::Transport(_) => "transport".into(),
        }
    }
}

#[derive(Clone)]
struct ConnectCfg {
    url: Arc<str>,
    ws: WebSocketConfig,
    timeout: Duration,
}

/// A connection that completed the SignalR handshake, with any records that followed the
/// handshake response in the same frame.
struct Conn {
    ws: Ws,
    leftover: Option<Vec<u8>>,
}

async fn connect(cfg: &ConnectCfg, token: &str) -> Result<Conn, ConnectError> {
    match tokio::time::timeout(cfg.timeout, connect_inner(cfg, token)).await {
        Ok(r) => r,
        Err(_) => Err(ConnectError::Timeout),
    }
}

async fn connect_inner(cfg: &ConnectCfg, token: &str) -> Result<Conn, ConnectError> {
    use tokio_tungstenite::tungstenite::Error as WsError;
    let mut req = (&*cfg.url)
        .into_client_request()
        .map_err(|e| ConnectError::Transport(format!("bad url: {e}")))?;
    let value = HeaderValue::from_str(&format!("Bearer {token}"))
        .map_err(|_| ConnectError::Transport("token is not a valid header value".into()))?;
    req.headers_mut().insert(AUTHORIZATION, value);
    let (mut ws, _resp) = tokio_tungstenite::connect_async_with_config(req, Some(cfg.ws), true)
        .await
        .map_err(|e| match e {
            WsError::Http(resp) => ConnectError::Http(resp.status().as_u16()),
            other => ConnectError::Transport(other.to_string()),
        })?;
    ws.send(Message::Text(Utf8Bytes::from_static(HANDSHAKE)))
        .await
        .map_err(|e| ConnectError::Transport(e.to_string()))?;
    let frame = loop {
        match ws.next().await {
            Some(Ok(Message::Text(t))) => break Vec::from(t.as_bytes()),
            Some(Ok(Message::Binary(b))) => break b.to_vec(),
            Some(Ok(Message::Close(c))) => {
                return Err(ConnectError::Handshake(format!("closed by server: {c:?}")));
            }
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(ConnectError::Transport(e.to_string())),
            None => return Err(ConnectError::Handshake("connection ended".into())),
        }
    };
    let Some(end) = frame.iter().position(|&b| b == RS) else {
        return Err(ConnectError::Handshake(format!(
            "response without record separator: {}",
            String::from_utf8_lossy(&frame)
        )));
    };
    let resp: Value = serde_json::from_slice(&frame[..end]).map_err(|_| {
        ConnectError::Handshake(format!(
            "response is not JSON: {}",
            String::from_utf8_lossy(&frame[..end])
        ))
    })?;
    if let Some(err) = resp.get("error") {
        return Err(ConnectError::Refused(err.to_string()));
    }
    if !resp.is_object() || resp.get("type").is_some() {
        return Err(ConnectError::Handshake(format!(
            "unexpected response {resp}"
        )));
    }
    // Like the JS client: one Ping right after the handshake.
    ws.send(Message::Text(PING))
        .await
        .map_err(|e| ConnectError::Transport(e.to_string()))?;
    let leftover = (end + 1 < frame.len()).then(|| frame[end + 1..].to_vec());
    Ok(Conn { ws, leftover })
}

/// One connection to open: its user's token and a slot index.
struct Plan {
    token: Arc<str>,
}

struct Opened {
    conns: Vec<Option<Conn>>,
    /// One connection's connect + upgrade + handshake, µs: (p50, p99, max). A max above 1 s
    /// usually means a SYN was dropped (full accept queue) and retransmitted.
    each_us: (u32, u32, u32),
    /// CPU use while connecting, % of one core: (this process, the server).
    cpu_pct: (Option<f64>, Option<f64>),
    failures: BTreeMap<String, u64>,
    failure_samples: Vec<String>,
    elapsed: Duration,
}

async fn open_all(
    cfg: &ConnectCfg,
    plans: Vec<Plan>,
    concurrency: usize,
    server_pid: Option<u32>,
) -> Opened {
    let sem = Arc::new(Semaphore::new(concurrency.max(1)));
    let cpu0 = cpu_sample(server_pid);
    let started = Instant::now();
    let mut set = JoinSet::new();
    let n = plans.len();
    for (i, plan) in plans.into_iter().enumerate() {
        let sem = sem.clone();
        let cfg = cfg.clone();
        set.spawn(async move {
            let _permit = sem.acquire_owned().await;
            let t = Instant::now();
            let r = connect(&cfg, &plan.token).await;
            (i, t.elapsed(), r)
        });
    }
    let mut conns: Vec<Option<Conn>> = (0..n).map(|_| None).collect();
    let mut failures = BTreeMap::new();
    let mut failure_samples = Vec::new();
    let mut times_us: Vec<u32> = Vec::with_capacity(n);
    while let Some(r) = set.join_next().await {
        if let Ok((_, t, _)) = &r {
            times_us.push(u32::try_from(t.as_micros()).unwrap_or(u32::MAX));
        }
        match r {
            Ok((i, _, Ok(c))) => conns[i] = Some(c),
            Ok((_, _, Err(e))) => {
                *failures.entry(e.kind()).or_insert(0) += 1;
                if failure_samples.len() < 5 {
                    failure_samples.push(e.to_string());
                }
            }
            Err(e) => {
                *failures.entry("task".to_owned()).or_insert(0) += 1;
                failure_samples.push(e.to_string());
            }
        }
    }
    let elapsed = started.elapsed();
    let cpu1 = cpu_sample(server_pid);
    times_us.sort_unstable();
    Opened {
        conns,
        each_us: (
            percentile(&times_us, 0.5),
            percentile(&times_us, 0.99),
            times_us.last().copied().unwrap_or(0),
        ),
        cpu_pct: (
            cpu_pct(&cpu0, &cpu1, |c| c.own_us),
            cpu_pct(&cpu0, &cpu1, |c| c.server_us),
        ),
        failures,
        failure_samples,
        elapsed,
    }
}

// ---------------------------------------------------------------------------------------------
// Receivers
// ---------------------------------------------------------------------------------------------

struct RecvCtx {
    user: usize,
    latencies_us: Vec<u32>,
    measured: u64,
    warmup: u64,
    anomalies: Anomalies,
    live: Arc<Live>,
}

impl RecvCtx {
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
async fn receiver(
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

// ---------------------------------------------------------------------------------------------
// Senders
// ---------------------------------------------------------------------------------------------

/// Times of the run, in nanoseconds since the epoch.
struct Sched {
    start_ns: u64,
    /// End of the warm-up: messages intended from here on are measured.
    measure_ns: u64,
    /// End of the measured window; pulled in by Ctrl-C.
    end_ns: AtomicU64,
    drain_deadline_ns: AtomicU64,
}

impl Sched {
    fn end(&self) -> u64 {
        self.end_ns.load(Ordering::Relaxed)
    }
}

struct SendCfg {
    users: usize,
    window: usize,
    seed: u64,
    spin_ns: u64,
    frames: FrameBuilder,
}

fn sender_rng(seed: u64, sender: usize) -> XorShift {
    XorShift::new(seed ^ ((sender as u64) << 32 | 0x5bd1))
}

/// Closed loop: keeps `window` invocations in flight until the end of the window, then
/// waits for the outstanding Completions (until the drain deadline).
async fn closed_sender(conn: Conn, idx: usize, cfg: Arc<SendCfg>, sched: Arc<Sched>) -> SendResult {
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
fn sender_frame(
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

type Sink = SplitSink<Ws, Message>;
type Stream = SplitStream<Ws>;

/// Open loop, read side of a sender: nothing should come back but Pings.
async fn sender_reader(
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

struct PacedSender {
    idx: usize,
    sink: Sink,
    rng: XorShift,
    offset_ns: f64,
    alive: bool,
    dirty: bool,
    last_send_ns: u64,
}

/// Open loop: drives its share of the senders on the fixed schedule. Sender `idx` sends
/// message k at `start + idx/R + k·S/R`.
async fn pacer(
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

// ---------------------------------------------------------------------------------------------
// /proc sampling
// ---------------------------------------------------------------------------------------------

/// Resident set size of `pid` in bytes.
fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// User + system CPU time of `pid` (all threads), in microseconds (USER_HZ = 100).
fn cpu_us(pid: &str) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 2..];
    let mut f = after.split_whitespace();
    // After the command name: state is field 3; utime and stime are fields 14 and 15.
    let utime: u64 = f.nth(11)?.parse().ok()?;
    let stime: u64 = f.next()?.parse().ok()?;
    Some((utime + stime) * 10_000)
}

/// Busy CPU time of the whole machine (all cores), in microseconds (USER_HZ = 100).
fn machine_busy_us() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal: busy = all but idle and iowait.
    let busy = v
        .iter()
        .take(8)
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4)
        .map(|(_, x)| x)
        .sum::<u64>();
    Some(busy * 10_000)
}

#[derive(Clone, Copy)]
struct CpuSample {
    at: Instant,
    server_us: Option<u64>,
    own_us: Option<u64>,
    machine_us: Option<u64>,
}

/// CPU use between two samples, in % of one core.
fn cpu_pct(a: &CpuSample, b: &CpuSample, f: impl Fn(&CpuSample) -> Option<u64>) -> Option<f64> {
    let secs = b.at.duration_since(a.at).as_secs_f64();
    match (f(a), f(b)) {
        (Some(x), Some(y)) if secs > 0.0 => Some(y.saturating_sub(x) as f64 / 1e6 / secs * 100.0),
        _ => None,
    }
}

fn cpu_sample(server: Option<u32>) -> CpuSample {
    CpuSample {
        at: Instant::now(),
        server_us: server.and_then(|p| cpu_us(&p.to_string())),
        own_us: cpu_us("self"),
        machine_us: machine_busy_us(),
    }
}

/// Soft and hard open-files limits of this process.
fn nofile_limits() -> Option<(u64, u64)> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    let mut f = line["Max open files".len()..].split_whitespace();
    let soft = f.next()?.parse().unwrap_or(u64::MAX);
    let hard = f.next()?.parse().unwrap_or(u64::MAX);
    Some((soft, hard))
}

fn check_nofile(needed: usize) -> anyhow::Result<()> {
    if let Some((soft, hard)) = nofile_limits() {
        let needed = needed as u64 + 64;
        if soft < needed {
            bail!(
                "{needed} open files are needed but the soft limit is {soft} (hard {hard}); \
                 run `ulimit -n {hard}` first"
            );
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Statistics and the report
// ---------------------------------------------------------------------------------------------

fn percentile(sorted: &[u32], q: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn mib(b: u64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

struct Tokens {
    auth: auth::Authenticator,
    ttl: Duration,
}

impl Tokens {
    fn new(secret: &str, ttl: Duration) -> anyhow::Result<Self> {
        let cfg = auth::JwtConfig::new(secret.as_bytes().to_vec())
            .map_err(|e| anyhow::anyhow!("--jwt-secret: {e}"))?;
        Ok(Self {
            auth: auth::Authenticator::new(cfg),
            ttl,
        })
    }

    fn issue(&self, user: &str) -> anyhow::Result<Arc<str>> {
        let id = UserId::new(user).with_context(|| format!("user id {user:?}"))?;
        Ok(Arc::from(self.auth.issue(&id, self.ttl)))
    }
}

fn connect_cfg(args: &Args) -> ConnectCfg {
    ConnectCfg {
        url: Arc::from(args.url.as_str()),
        ws: WebSocketConfig::default()
            .read_buffer_size(args.read_buffer.max(512))
            .write_buffer_size(64 * 1024),
        timeout: Duration::from_secs_f64(args.connect_timeout.max(0.1)),
    }
}

fn connect_json(o: &Opened, attempted: usize) -> Value {
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

fn anomalies_json(a: &Anomalies) -> Value {
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

fn print_anomalies(a: &Anomalies) {
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

fn print_connect(label: &str, o: &Opened, attempted: usize) {
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

// ---------------------------------------------------------------------------------------------
// Modes
// ---------------------------------------------------------------------------------------------

/// What a mode hands back to `main`: whether the run was clean.
struct Outcome {
    clean: bool,
}

async fn run_idle(args: &Args, n: usize) -> anyhow::Result<Outcome> {
    let per_user = args.connections.max(1);
    let tokens = Tokens::new(&args.jwt_secret, Duration::from_secs(args.token_ttl))?;
    let users = n.div_ceil(per_user);
    let mut user_tokens = Vec::with_capacity(users);
    for u in 0..users {
        user_tokens.push(tokens.issue(&receiver_name(u))?);
    }
    let plans: Vec<Plan> = (0..n)
        .map(|i| Plan {
            token: user_tokens[i / per_user].clone(),
        })
        .collect();
    let pid = args.server_pid;
    let rss_before = pid.and_then(rss_bytes);
    let opened = open_all(&connect_cfg(args), plans, args.connect_concurrency, pid).await;
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

async fn run_traffic(args: &Args) -> anyhow::Result<Outcome> {
    let users = args.users;
    let per_user = args.connections;
    let nsend = args.senders;
    if users == 0 || per_user == 0 || nsend == 0 {
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
    let window = args.window.max(1);
    let tokens = Tokens::new(&args.jwt_secret, Duration::from_secs(args.token_ttl))?;
    let mut recv_plans = Vec::with_capacity(users * per_user);
    for u in 0..users {
        let t = tokens.issue(&receiver_name(u))?;
        for _ in 0..per_user {
            recv_plans.push(Plan { token: t.clone() });
        }
    }
    let mut send_plans = Vec::with_capacity(nsend);
    for i in 0..nsend {
        send_plans.push(Plan {
            token: tokens.issue(&sender_name(i))?,
        });
    }
    let pid = args.server_pid;
    let ccfg = connect_cfg(args);
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
    let connect_failed = users * per_user - recv_ok + nsend - send_ok;
    if recv_ok == 0 || send_ok == 0 {
        bail!("no receiver or no sender could connect");
    }

    let cfg = Arc::new(SendCfg {
        users,
        window,
        seed: args.seed,
        spin_ns: args.spin_us.saturating_mul(1000),
        frames: FrameBuilder::new(args.payload),
    });
    let start_ns = now_ns() + 100_000_000;
    let measure_ns = start_ns + secs_to_ns(args.warmup);
    let end_ns = measure_ns + secs_to_ns(args.duration).max(1);
    let sched = Arc::new(Sched {
        start_ns,
        measure_ns,
        end_ns: AtomicU64::new(end_ns),
        drain_deadline_ns: AtomicU64::new(end_ns + secs_to_ns(args.drain)),
    });

    // Receivers.
    let live = Arc::new(Live::default());
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut receivers = JoinSet::new();
    let mut live_conns = vec![0u64; users];
    for (i, c) in recv_open.conns.into_iter().enumerate() {
        if let Some(c) = c {
            let user = i / per_user;
            live_conns[user] += 1;
            receivers.spawn(receiver(c, user, live.clone(), stop_rx.clone()));
        }
    }

    // Senders.
    let mut closed = JoinSet::new();
    let mut pacers = JoinSet::new();
    let mut readers = JoinSet::new();
    match args.rate {
        None => {
            for (i, c) in send_open.conns.into_iter().enumerate() {
                if let Some(c) = c {
                    closed.spawn(closed_sender(c, i, cfg.clone(), sched.clone()));
                }
            }
        }
        Some(rate) => {
            let npacers = args.threads.clamp(1, nsend);
            let mut groups: Vec<Vec<PacedSender>> = (0..npacers).map(|_| Vec::new()).collect();
            let mut early = Anomalies::default();
            for (i, c) in send_open.conns.into_iter().enumerate() {
                let Some(Conn { ws, leftover }) = c else {
                    continue;
                };
                if let Some(l) = leftover {
                    let mut r = SendResult::new(0);
                    sender_frame(&l, &mut VecDeque::new(), &mut r, false);
                    early.merge(r.anomalies);
                }
                let (sink, stream) = ws.split();
                readers.spawn(sender_reader(i, stream, stop_rx.clone()));
                groups[i % npacers].push(PacedSender {
                    idx: i,
                    sink,
                    rng: sender_rng(args.seed, i),
                    offset_ns: 0.0,
                    alive: true,
                    dirty: false,
                    last_send_ns: 0,
                });
            }
            for g in groups {
                pacers.spawn(pacer(g, nsend, rate, cfg.clone(), sched.clone()));
            }
            if early.errors() > 0 {
                readers.spawn(async move { (usize::MAX, None, early) });
            }
        }
    }

    // Ctrl-C pulls the end of the window in.
    let (abort_tx, mut abort_rx) = watch::channel(false);
    let sched_c = sched.clone();
    let ctrlc = tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            let now = now_ns();
            sched_c
                .end_ns
                .fetch_min(now.max(sched_c.measure_ns), Ordering::Relaxed);
            sched_c
                .drain_deadline_ns
                .fetch_min(now + 2_000_000_000, Ordering::Relaxed);
            let _ = abort_tx.send(true);
        }
        // Keep the sender alive: a closed channel would end every wait at once.
        std::future::pending::<()>().await;
        drop(abort_tx);
    });
    let wait_until = async |ns: u64, abort_rx: &mut watch::Receiver<bool>| {
        tokio::select! {
            _ = tokio::time::sleep_until(instant_at(ns)) => {}
            _ = abort_rx.changed() => {}
        }
    };
    wait_until(measure_ns, &mut abort_rx).await;
    let cpu0 = cpu_sample(pid);
    wait_until(sched.end(), &mut abort_rx).await;
    let cpu1 = cpu_sample(pid);
    let window_end_ns = sched.end().min(now_ns()).max(measure_ns);

    // Senders finish: pacers at the end of the window, closed-loop senders once their
    // Completions are in (or at the drain deadline).
    let mut sent = SendResult::new(users);
    let mut anomalies = Anomalies::default();
    let mut sinks: BTreeMap<usize, Sink> = BTreeMap::new();
    let merge_send = |sent: &mut SendResult, anomalies: &mut Anomalies, r: SendResult| {
        for (a, b) in sent.per_target.iter_mut().zip(&r.per_target) {
            *a += b;
        }
        sent.measured += r.measured;
        sent.warmup += r.warmup;
        sent.max_lag_ns = sent.max_lag_ns.max(r.max_lag_ns);
        sent.late_1ms += r.late_1ms;
        sent.rtt_us.extend_from_slice(&r.rtt_us);
        anomalies.merge(r.anomalies);
    };
    while let Some(r) = closed.join_next().await {
        if let Ok(r) = r {
            merge_send(&mut sent, &mut anomalies, r);
        }
    }
    while let Some(r) = pacers.join_next().await {
        if let Ok((r, s)) = r {
            merge_send(&mut sent, &mut anomalies, r);
            sinks.extend(s);
        }
    }
    let senders_done_ns = now_ns();

    // Drain: wait for the deliveries still on their way.
    let expected_total: u64 = sent
        .per_target
        .iter()
        .zip(&live_conns)
        .map(|(&m, &c)| u64::from(m) * c)
        .sum();
    let drain_deadline = sched.drain_deadline_ns.load(Ordering::Relaxed);
    loop {
        if live.measured_deliveries.load(Ordering::Relaxed) >= expected_total {
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
    let drained_ns = now_ns();
    let _ = stop_tx.send(true);
    ctrlc.abort();
    let aborted = *abort_rx.borrow();

    // Collect.
    let mut latencies: Vec<u32> = Vec::new();
    let mut received: u64 = 0;
    let mut warm_received: u64 = 0;
    let mut losses: u64 = 0;
    let mut duplicates: u64 = 0;
    while let Some(r) = receivers.join_next().await {
        let Ok(r) = r else { continue };
        let expected = u64::from(sent.per_target[r.user]);
        losses += expected.saturating_sub(r.measured);
        duplicates += r.measured.saturating_sub(expected);
        received += r.measured;
        warm_received += r.warmup;
        anomalies.merge(r.anomalies);
        if latencies.is_empty() {
            latencies = r.latencies_us;
        } else {
            latencies.extend_from_slice(&r.latencies_us);
        }
    }
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
    let rss_end = pid.and_then(rss_bytes);
    latencies.sort_unstable();
    sent.rtt_us.sort_unstable();
    let rtt = &sent.rtt_us;
    let (rtt50, rtt99, rttmax) = (
        percentile(rtt, 0.5),
        percentile(rtt, 0.99),
        rtt.last().copied().unwrap_or(0),
    );

    // Report.
    let window_s = (window_end_ns - measure_ns) as f64 / 1e9;
    let rate_of = |n: u64| {
        if window_s > 0.0 {
            n as f64 / window_s
        } else {
            0.0
        }
    };
    let achieved = rate_of(sent.measured);
    let delivered = rate_of(received);
    let mean_us = if latencies.is_empty() {
        0.0
    } else {
        latencies.iter().map(|&l| f64::from(l)).sum::<f64>() / latencies.len() as f64
    };
    let (p50, p90, p99, p999, max) = (
        percentile(&latencies, 0.50),
        percentile(&latencies, 0.90),
        percentile(&latencies, 0.99),
        percentile(&latencies, 0.999),
        latencies.last().copied().unwrap_or(0),
    );
    let cpu_secs = cpu1.at.duration_since(cpu0.at).as_secs_f64();
    let pct = |a: Option<u64>, b: Option<u64>| match (a, b) {
        (Some(a), Some(b)) if cpu_secs > 0.0 => {
            Some((b.saturating_sub(a)) as f64 / 1e6 / cpu_secs * 100.0)
        }
        _ => None,
    };
    let server_cpu_pct = pct(cpu0.server_us, cpu1.server_us);
    let own_cpu_pct = pct(cpu0.own_us, cpu1.own_us);
    // Everything else that ran on the machine meanwhile (noise), in % of one core.
    let other_cpu_pct = pct(cpu0.machine_us, cpu1.machine_us)
        .map(|m| (m - own_cpu_pct.unwrap_or(0.0) - server_cpu_pct.unwrap_or(0.0)).max(0.0));
    let deliveries_in_cpu_window = delivered * cpu_secs;
    let server_us_per_delivery = match (cpu0.server_us, cpu1.server_us) {
        (Some(a), Some(b)) if deliveries_in_cpu_window > 0.0 => {
            Some(b.saturating_sub(a) as f64 / deliveries_in_cpu_window)
        }
        _ => None,
    };
    let conns_total = recv_ok + send_ok;
    let rss_per_conn = match (rss_before, rss_connected) {
        (Some(b), Some(a)) if conns_total > 0 => Some((a as f64 - b as f64) / conns_total as f64),
        _ => None,
    };
    let mode = if args.rate.is_some() {
        "open"
    } else {
        "closed"
    };
    let clean = connect_failed == 0
        && losses == 0
        && duplicates == 0
        && anomalies.errors() == 0
        && !aborted
        && sent.measured > 0;

    println!(
        "mode               {mode} loop, {users} users × {per_user} connections, {nsend} senders, payload {} B{}",
        args.payload,
        if args.rate.is_none() {
            format!(", window {window}")
        } else {
            String::new()
        }
    );
    println!(
        "window             {:.3} s measured (warm-up {:.1} s), drain {:.3} s",
        window_s,
        args.warmup,
        drained_ns.saturating_sub(senders_done_ns.max(window_end_ns)) as f64 / 1e9
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
        latencies.len()
    );
    if args.rate.is_none() {
        println!(
            "completion RTT µs  p50 {rtt50}  p99 {rtt99}  max {rttmax}  (invocation → Completion, n={})",
            rtt.len()
        );
    }
    if args.rate.is_some() {
        println!(
            "schedule lag       max {:.3} ms, {} sends > 1 ms late",
            sent.max_lag_ns as f64 / 1e6,
            sent.late_1ms
        );
    }
    if let Some(p) = own_cpu_pct {
        println!("loadgen CPU        {p:.0} % of a core");
    }
    if let Some(p) = server_cpu_pct {
        println!(
            "server CPU         {p:.0} % of a core{}",
            server_us_per_delivery
                .map(|u| format!(", {u:.2} µs per delivery"))
                .unwrap_or_default()
        );
    }
    if let Some(p) = other_cpu_pct {
        println!("other CPU          {p:.0} % of a core (other processes on the machine)");
    }
    if let (Some(b), Some(a)) = (rss_before, rss_connected) {
        println!(
            "server RSS         {:.1} → {:.1} MiB after connecting ({:.0} B per connection){}",
            mib(b),
            mib(a),
            rss_per_conn.unwrap_or(0.0),
            rss_end
                .map(|e| format!(", {:.1} MiB at the end", mib(e)))
                .unwrap_or_default()
        );
    }
    print_anomalies(&anomalies);
    if aborted {
        println!("(interrupted)");
    }
    if args.json {
        let report = json!({
            "mode": mode,
            "users": users,
            "connections_per_user": per_user,
            "senders": nsend,
            "payload_bytes": args.payload,
            "window": if args.rate.is_none() { Some(window) } else { None },
            "connect": { "receivers": recv_connect, "senders": send_connect },
            "measured_seconds": window_s,
            "warmup_seconds": args.warmup,
            "offered_msgs_per_s": args.rate,
            "achieved_msgs_per_s": achieved,
            "delivered_per_s": delivered,
            "messages": sent.measured,
            "warmup_messages": sent.warmup,
            "warmup_deliveries": warm_received,
            "expected_deliveries": expected_total,
            "received_deliveries": received,
            "losses": losses,
            "duplicates": duplicates,
            "latency_us": {
                "p50": p50, "p90": p90, "p99": p99, "p999": p999, "max": max,
                "mean": mean_us, "samples": latencies.len(),
            },
            "completion_rtt_us": if args.rate.is_none() {
                Some(json!({ "p50": rtt50, "p99": rtt99, "max": rttmax, "samples": rtt.len() }))
            } else { None },
            "schedule_max_lag_us": args.rate.map(|_| sent.max_lag_ns / 1000),
            "schedule_late_1ms": args.rate.map(|_| sent.late_1ms),
            "loadgen_cpu_pct": own_cpu_pct,
            "server_cpu_pct": server_cpu_pct,
            "server_cpu_us_per_delivery": server_us_per_delivery,
            "other_cpu_pct": other_cpu_pct,
            "server_rss_bytes": { "before": rss_before, "connected": rss_connected, "end": rss_end },
            "server_bytes_per_connection": rss_per_conn,
            "errors": anomalies_json(&anomalies),
            "interrupted": aborted,
        });
        println!("{report}");
    }
    Ok(Outcome { clean })
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    epoch();
    let needed = match args.idle {
        Some(n) => n,
        None => args.users * args.connections + args.senders,
    };
    if let Err(e) = check_nofile(needed) {
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
            Some(n) => run_idle(&args, n).await,
            None => run_traffic(&args).await,
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

    #[test]
    fn frame_round_trip_open_loop() {
        let fb = FrameBuilder::new(64);
        let f = fb.build(17, 5, 123_456_789, true, None);
        let s = f.as_str();
        assert!(s.ends_with('\u{1e}'));
        let v: Value = serde_json::from_str(s.trim_end_matches('\u{1e}')).expect("json");
        assert_eq!(v["type"], 1);
        assert!(v.get("invocationId").is_none());
        assert_eq!(v["target"], "SendChatMessage");
        assert_eq!(v["arguments"][0], "user-17");
        let payload = v["arguments"][1].as_str().expect("payload");
        assert_eq!(payload.len(), 64);
        // What the hub sends to user-17.
        let delivered = format!(
            "{{\"type\":1,\"target\":\"addChatMessage\",\"arguments\":[\"sender-3: {payload}\"]}}\u{1e}"
        );
        let (mut recs, whole) = records(delivered.as_bytes());
        assert!(whole);
        let rec = recs.next().expect("one record");
        assert_eq!(
            classify(rec),
            Record::Chat(Embedded {
                measured: true,
                target: 17,
                seq: 5,
                intended_ns: 123_456_789
            })
        );
        assert!(recs.next().is_none());
    }

    #[test]
    fn frame_closed_loop_has_invocation_id() {
        let fb = FrameBuilder::new(48);
        let f = fb.build(0, 9, u64::MAX, false, Some(42));
        let v: Value = serde_json::from_str(f.as_str().trim_end_matches('\u{1e}')).expect("json");
        assert_eq!(v["invocationId"], "42");
        let payload = v["arguments"][1].as_str().expect("payload");
        assert!(payload.len() >= 48);
        assert_eq!(
            parse_embedded(payload.as_bytes()),
            Some(Embedded {
                measured: false,
                target: 0,
                seq: 9,
                intended_ns: u64::MAX
            })
        );
    }

    #[test]
    fn several_records_per_frame_any_order() {
        let frame = b"{\"type\":6}\x1e{\"arguments\":[\"bob: m1.2.3.xx\"],\"target\":\"addChatMessage\",\"type\":1}\x1e{\"type\":3,\"invocationId\":\"7\",\"result\":null}\x1e{\"invocationId\":\"8\",\"type\":3,\"error\":\"boom\"}\x1e";
        let (recs, whole) = records(frame);
        assert!(whole);
        let got: Vec<Record> = recs.map(classify).collect();
        assert_eq!(
            got,
            vec![
                Record::Ping,
                Record::Chat(Embedded {
                    measured: true,
                    target: 1,
                    seq: 2,
                    intended_ns: 3
                }),
                Record::Completion {
                    id: Some(7),
                    error: false
                },
                Record::Completion {
                    id: Some(8),
                    error: true
                },
            ]
        );
    }

    #[test]
    fn partial_frame_is_flagged() {
        let (recs, whole) = records(b"{\"type\":6}\x1e{\"type\":");
        assert!(!whole);
        assert_eq!(recs.count(), 2);
    }

    #[test]
    fn slow_path_cases() {
        assert_eq!(
            classify(b"{\"type\":7,\"error\":\"bye\"}"),
            Record::Close(Some("bye".into()))
        );
        assert_eq!(classify(b"{ \"type\" : 6 }"), Record::Ping);
        assert_eq!(
            classify(b"{\"type\":1,\"target\":\"showErrorMessage\",\"arguments\":[\"nope\"]}"),
            Record::ShowError("nope".into())
        );
        // Case-insensitive target and whitespace go through the JSON parser.
        assert_eq!(
            classify(
                b"{\"type\": 1, \"target\": \"AddChatMessage\", \"arguments\": [\"a: w4.5.6.\"]}"
            ),
            Record::Chat(Embedded {
                measured: false,
                target: 4,
                seq: 5,
                intended_ns: 6
            })
        );
        assert!(matches!(classify(b"not json"), Record::Other(_)));
        assert!(matches!(
            classify(
                b"{\"type\":1,\"target\":\"addChatMessage\",\"arguments\":[\"someone: hello\"]}"
            ),
            Record::Other(_)
        ));
        assert!(matches!(classify(b"{\"type\":42}"), Record::Other(_)));
    }

    #[test]
    fn numbers_are_checked() {
        assert_eq!(parse_num(b"123.", b'.'), Some((123, &b""[..])));
        assert_eq!(parse_num(b".", b'.'), None);
        assert_eq!(parse_num(b"12a.", b'.'), None);
        assert_eq!(parse_num(b"99999999999999999999999.", b'.'), None);
        assert_eq!(parse_num(b"12", b'.'), None);
        assert_eq!(parse_embedded(b"x1.2.3."), None);
        assert_eq!(parse_embedded(b""), None);
    }

    #[test]
    fn find_works() {
        assert_eq!(find(b"hello world", b"world"), Some(6));
        assert_eq!(find(b"aab", b"ab"), Some(1));
        assert_eq!(find(b"ab", b"abc"), None);
        assert_eq!(find(b"", b"a"), None);
        assert_eq!(find(b"abc", b"c"), Some(2));
    }

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

    #[test]
    fn percentiles() {
        let v: Vec<u32> = (1..=1000).collect();
        assert_eq!(percentile(&v, 0.5), 500);
        assert_eq!(percentile(&v, 0.99), 990);
        assert_eq!(percentile(&v, 0.999), 999);
        assert_eq!(percentile(&v, 1.0), 1000);
        assert_eq!(percentile(&[], 0.5), 0);
    }

    #[test]
    fn proc_parsing() {
        assert!(cpu_us("self").is_some());
        assert!(rss_bytes(std::process::id()).is_some_and(|b| b > 0));
        assert!(nofile_limits().is_some());
    }
}
