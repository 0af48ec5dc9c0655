//! Opening connections: the token each one presents, the WebSocket upgrade and SignalR
//! handshake of one connection, and opening many at once with a bound on concurrency.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures_util::{SinkExt as _, StreamExt as _};
use serde_json::Value;
use switchboard::auth;
use switchboard_core::UserId;
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::http::header::AUTHORIZATION;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::Args;
use crate::report::percentile;
use crate::sample::{cpu_pct, cpu_sample};
use crate::wire::{HANDSHAKE, PING, RS};

/// A client WebSocket.
pub(crate) type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Mints the HS256 tokens the connections present.
pub(crate) struct Tokens {
    /// Signs the tokens.
    auth: auth::Authenticator,
    /// Lifetime of each token.
    ttl: Duration,
}

impl Tokens {
    /// Tokens signed with `secret`, valid for `ttl`.
    pub(crate) fn new(secret: &str, ttl: Duration) -> anyhow::Result<Self> {
        let cfg = auth::JwtConfig::new(secret.as_bytes().to_vec())
            .map_err(|e| anyhow::anyhow!("--jwt-secret: {e}"))?;
        Ok(Self {
            auth: auth::Authenticator::new(cfg),
            ttl,
        })
    }

    /// A token for `user`.
    pub(crate) fn issue(&self, user: &str) -> anyhow::Result<Arc<str>> {
        let id = UserId::new(user).with_context(|| format!("user id {user:?}"))?;
        Ok(Arc::from(self.auth.issue(&id, self.ttl)))
    }
}

/// Why a connection could not be opened.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConnectError {
    /// The upgrade was answered with this HTTP status.
    #[error("HTTP {0}")]
    Http(u16),
    /// The handshake response carried this error.
    #[error("handshake refused: {0}")]
    Refused(String),
    /// The handshake response was not one.
    #[error("handshake: {0}")]
    Handshake(String),
    /// Connecting took longer than `--connect-timeout`.
    #[error("timed out")]
    Timeout,
    /// TCP, WebSocket or request errors.
    #[error("{0}")]
    Transport(String),
}

impl ConnectError {
    /// Short name of the failure, for counting failures by kind.
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

/// How to open a connection.
#[derive(Clone)]
pub(crate) struct ConnectCfg {
    /// WebSocket buffer sizes.
    ws: WebSocketConfig,
    /// Limit for TCP connect + upgrade + handshake.
    timeout: Duration,
}

impl ConnectCfg {
    /// The connection settings of the command line.
    pub(crate) fn new(args: &Args) -> Self {
        Self {
            ws: WebSocketConfig::default()
                .read_buffer_size(args.read_buffer.max(512))
                .write_buffer_size(64 * 1024),
            timeout: Duration::from_secs_f64(args.connect_timeout.max(0.1)),
        }
    }
}

/// A connection that completed the SignalR handshake, with any records that followed the
/// handshake response in the same frame.
pub(crate) struct Conn {
    /// The WebSocket.
    pub(crate) ws: Ws,
    /// Records that came in the handshake response's frame, after it.
    pub(crate) leftover: Option<Vec<u8>>,
}

/// Opens one connection to `url`, within the configured timeout.
async fn connect(cfg: &ConnectCfg, url: &str, token: &str) -> Result<Conn, ConnectError> {
    match tokio::time::timeout(cfg.timeout, connect_inner(cfg, url, token)).await {
        Ok(r) => r,
        Err(_) => Err(ConnectError::Timeout),
    }
}

/// TCP connect, WebSocket upgrade with the token, handshake, first Ping.
async fn connect_inner(cfg: &ConnectCfg, url: &str, token: &str) -> Result<Conn, ConnectError> {
    use tokio_tungstenite::tungstenite::Error as WsError;
    let mut req = url
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

/// One connection to open.
pub(crate) struct Plan {
    /// The hub URL it opens.
    pub(crate) url: Arc<str>,
    /// The token of the connection's user.
    pub(crate) token: Arc<str>,
}

/// The URLs of `urls` as shared strings, for plans to pick from round-robin.
pub(crate) fn shared_urls(urls: &[String]) -> Vec<Arc<str>> {
    urls.iter().map(|u| Arc::from(u.as_str())).collect()
}

/// What opening a batch of connections gave.
pub(crate) struct Opened {
    /// The connections in plan order; `None` where one failed.
    pub(crate) conns: Vec<Option<Conn>>,
    /// One connection's connect + upgrade + handshake, µs: (p50, p99, max). A max above 1 s
    /// usually means a SYN was dropped (full accept queue) and retransmitted.
    pub(crate) each_us: (u32, u32, u32),
    /// CPU use while connecting, % of one core: (this process, the server).
    pub(crate) cpu_pct: (Option<f64>, Option<f64>),
    /// Failures by kind.
    pub(crate) failures: BTreeMap<String, u64>,
    /// A few failure messages.
    pub(crate) failure_samples: Vec<String>,
    /// Time to open the whole batch.
    pub(crate) elapsed: Duration,
}

/// Opens a connection for each plan, `concurrency` at a time, and measures it (with the
/// server's CPU use if `server_pid` is known).
pub(crate) async fn open_all(
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
            let r = connect(&cfg, &plan.url, &plan.token).await;
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
