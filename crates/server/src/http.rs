//! The HTTP/1.1 server in front of the application, with limits against clients that hold
//! connections open without using them (slow-loris) or that open too many.
//!
//! [`serve`] accepts TCP connections, sets `TCP_NODELAY` on each, and serves an axum
//! [`Router`] on them with hyper, including WebSocket upgrades. [`HttpLimits`] bounds:
//!
//! * **how long a request head may take** ([`HttpLimits::header_read_timeout`]). The clock
//!   runs whenever the server waits for a request head: on a fresh connection, while a head
//!   trickles in, and on a keep-alive connection between two requests. A connection that
//!   sends nothing, or sends its head too slowly, is closed. This is also the idle timeout
//!   of a connection before it becomes a WebSocket;
//! * **how long one plain request may take**, reading its body included
//!   ([`HttpLimits::request_timeout`]); past it the client gets `408` and the connection
//!   closes. A WebSocket upgrade is answered at once and the WebSocket is not subject to it:
//!   the hub's own keep-alive and client timeout govern it;
//! * **how large a request head may be** ([`HttpLimits::max_request_head`]); larger heads get
//!   `431 Request Header Fields Too Large`;
//! * **how many connections may be open**, in total ([`HttpLimits::max_connections`]) and
//!   per client address ([`HttpLimits::max_connections_per_address`]). A WebSocket counts
//!   until its socket closes. A connection over a cap gets a short `503` with a JSON body
//!   naming the limit (`{"error":"too many connections from your address (limit 1024)"}`)
//!   and is closed; the server never waits on it.
//!
//! The total cap defaults to the process's open-files limit less a reserve
//! ([`default_max_connections`]), so the server does not run out of file descriptors and
//! can always answer. Errors of `accept` (such as running out of file descriptors anyway)
//! make the server pause briefly instead of spinning. Log lines that clients can cause (a
//! refused connection, a head that timed out, a failed accept) are rate limited: the first
//! is logged, then at most one every few seconds with the number left out.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::pin::{Pin, pin};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderValue, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::throttle::Throttle;

/// File descriptors kept out of [`default_max_connections`] for everything that is not a
/// client connection: the listener, the store, log files, and refused connections while
/// their `503` goes out.
pub const RESERVED_FILE_DESCRIPTORS: u64 = 256;

/// The total connection cap used when the open-files limit cannot be read.
const FALLBACK_MAX_CONNECTIONS: usize = 4096;

/// Hyper's smallest accepted read buffer, in bytes.
const MIN_READ_BUFFER: usize = 8192;

/// Most refused connections kept open at once while their `503` is delivered; beyond it a
/// refused connection gets its answer written without waiting and is closed right away.
/// Well below [`RESERVED_FILE_DESCRIPTORS`].
const MAX_LINGERING_REFUSALS: usize = 64;

/// How long a refused connection is kept open so the client can read its `503`.
const REFUSAL_LINGER: Duration = Duration::from_secs(1);

/// Interval between two log lines about events clients can cause.
const CLIENT_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Interval between two log lines about failed accepts.
const ACCEPT_LOG_INTERVAL: Duration = Duration::from_secs(5);

/// Pause after the first failed accept; it doubles on each further failure in a row.
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);

/// Longest pause after failed accepts.
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Limits of the HTTP server. Build with [`HttpLimits::default`] and the `with_*` setters.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct HttpLimits {
    /// How long a client has to send a complete request head, from the moment the server
    /// waits for one: right after the connection opens, and on a keep-alive connection
    /// after each response. A connection that has not sent a complete head by then is
    /// closed without an answer, so this is also the idle timeout of connections that are
    /// not WebSockets. Must be positive. Default 10 s.
    pub header_read_timeout: Duration,
    /// How long one plain HTTP request may take from its complete head until its response
    /// is ready, reading its body included. Past it the client gets `408 Request Timeout`
    /// and the connection is closed. WebSocket upgrades are answered at once; the
    /// WebSocket itself is not subject to it. Must be positive. Default 30 s.
    pub request_timeout: Duration,
    /// Largest request head (request line and headers), in bytes. A larger head gets
    /// `431 Request Header Fields Too Large` and the connection is closed. Default 32 KiB.
    pub max_request_head: usize,
    /// Most connections open at once, WebSockets included (each until its socket closes);
    /// `0` means unlimited. Further connections get `503 Service Unavailable` and are
    /// closed. Default: [`default_max_connections`], derived from the process's open-files
    /// limit when the value is built.
    pub max_connections: usize,
    /// Most connections open at once from one client address (an IPv4 address, or an IPv6
    /// `/64` network, which one subscriber usually holds whole); `0` means unlimited.
    /// Further connections from that address get `503 Service Unavailable` and are closed.
    /// Behind a reverse proxy or load balancer every client shares the proxy's address:
    /// raise it there, or set `0`. Default 1024.
    pub max_connections_per_address: usize,
}

impl Default for HttpLimits {
    fn default() -> Self {
        Self {
            header_read_timeout: Self::DEFAULT_HEADER_READ_TIMEOUT,
            request_timeout: Self::DEFAULT_REQUEST_TIMEOUT,
            max_request_head: Self::DEFAULT_MAX_REQUEST_HEAD,
            max_connections: default_max_connections(),
            max_connections_per_address: Self::DEFAULT_MAX_CONNECTIONS_PER_ADDRESS,
        }
    }
}

impl HttpLimits {
    /// Default of [`HttpLimits::header_read_timeout`].
    pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
    /// Default of [`HttpLimits::request_timeout`].
    pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
    /// Default of [`HttpLimits::max_request_head`].
    pub const DEFAULT_MAX_REQUEST_HEAD: usize = 32 * 1024;
    /// Default of [`HttpLimits::max_connections_per_address`].
    pub const DEFAULT_MAX_CONNECTIONS_PER_ADDRESS: usize = 1024;

    /// Sets [`HttpLimits::header_read_timeout`].
    #[must_use]
    pub fn with_header_read_timeout(mut self, value: Duration) -> Self {
        self.header_read_timeout = value;
        self
    }

    /// Sets [`HttpLimits::request_timeout`].
    #[must_use]
    pub fn with_request_timeout(mut self, value: Duration) -> Self {
        self.request_timeout = value;
        self
    }

    /// Sets [`HttpLimits::max_request_head`].
    #[must_use]
    pub fn with_max_request_head(mut self, bytes: usize) -> Self {
        self.max_request_head = bytes;
        self
    }

    /// Sets [`HttpLimits::max_connections`] (`0` = unlimited).
    #[must_use]
    pub fn with_max_connections(mut self, value: usize) -> Self {
        self.max_connections = value;
        self
    }

    /// Sets [`HttpLimits::max_connections_per_address`] (`0` = unlimited).
    #[must_use]
    pub fn with_max_connections_per_address(mut self, value: usize) -> Self {
        self.max_connections_per_address = value;
        self
    }
}

/// The default of [`HttpLimits::max_connections`]: the soft open-files limit
/// (`RLIMIT_NOFILE`) less [`RESERVED_FILE_DESCRIPTORS`], but at least half of the limit
/// when it is small. 4096 where the limit cannot be read.
pub fn default_max_connections() -> usize {
    match open_files_limit() {
        Ok((soft, _hard)) => connections_for_open_files(soft),
        Err(_) => FALLBACK_MAX_CONNECTIONS,
    }
}

/// Raises the soft open-files limit of the process to its hard limit, when it is lower, and
/// returns the soft limit in force afterwards. Call it before building [`HttpLimits`], whose
/// default connection cap follows the soft limit.
///
/// # Errors
///
/// The limit could not be read or changed.
pub fn raise_open_files_limit() -> io::Result<u64> {
    let (_soft, hard) = open_files_limit()?;
    rlimit::increase_nofile_limit(hard)
}

/// The soft and hard open-files limits.
#[cfg(unix)]
fn open_files_limit() -> io::Result<(u64, u64)> {
    rlimit::Resource::NOFILE.get()
}

/// The soft and hard open-files limits.
#[cfg(not(unix))]
fn open_files_limit() -> io::Result<(u64, u64)> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "no open-files limit on this platform",
    ))
}

fn connections_for_open_files(soft: u64) -> usize {
    let cap = soft.saturating_sub(RESERVED_FILE_DESCRIPTORS).max(soft / 2);
    usize::try_from(cap).unwrap_or(usize::MAX).max(1)
}

/// Serves `router` on `listener` with `limits` until `shutdown` completes.
///
/// Every accepted socket gets `TCP_NODELAY`. WebSocket upgrades are supported; an upgraded
/// connection keeps its place in the connection caps until its socket closes.
///
/// Once `shutdown` completes the server stops accepting, lets each open HTTP connection
/// finish the request it is serving (closing idle ones at once), and returns when they are
/// done, or after [`HttpLimits::header_read_timeout`] plus [`HttpLimits::request_timeout`]
/// at the latest, closing what is left. Upgraded WebSockets are not waited for: close them
/// from `shutdown` (as [`app::serve`](crate::app::serve) does with the hubs).
///
/// # Errors
///
/// None at present: a failed accept is retried after a pause. The `io::Result` is kept for
/// errors of the listener, like [`axum::serve()`]'s.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: HttpLimits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_request_head.max(MIN_READ_BUFFER))
        .max_header_size(limits.max_request_head);
    let server = Arc::new(Server {
        builder,
        service: RequestService {
            inner: TowerToHyperService::new(router),
            timeout: limits.request_timeout,
        },
        logs: Logs::default(),
    });
    let tracker = Arc::new(Tracker::new(
        limits.max_connections,
        limits.max_connections_per_address,
    ));
    let lingering = Arc::new(AtomicUsize::new(0));
    // Each connection task holds a receiver: a change asks it to finish gracefully, the
    // sender's drop closes it, and the sender sees when every task is done.
    let (stop_tx, _) = watch::channel(());
    let accept_throttle = Throttle::new(1, ACCEPT_LOG_INTERVAL);
    let mut backoff = ACCEPT_BACKOFF_MIN;

    let mut shutdown = pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            biased;
            () = &mut shutdown => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((tcp, peer)) => {
                backoff = ACCEPT_BACKOFF_MIN;
                if let Err(e) = tcp.set_nodelay(true) {
                    tracing::debug!(error = %e, "could not set TCP_NODELAY");
                }
                match tracker.admit(peer.ip()) {
                    Ok(permit) => {
                        let stop = stop_tx.subscribe();
                        tokio::spawn(Arc::clone(&server).connection(tcp, peer, permit, stop));
                    }
                    Err(refusal) => {
                        if let Some(suppressed) = server.logs.refused.allow() {
                            tracing::warn!(
                                peer = %peer.ip(),
                                suppressed,
                                "refused a connection: {refusal}"
                            );
                        }
                        refuse(tcp, &refusal, &lingering);
                    }
                }
            }
            Err(e) if is_connection_error(&e) => {}
            Err(e) => {
                if let Some(suppressed) = accept_throttle.allow() {
                    tracing::error!(
                        error = %e,
                        suppressed,
                        pause_ms = backoff.as_millis(),
                        "accepting a connection failed"
                    );
                }
                tokio::select! {
                    biased;
                    () = &mut shutdown => break,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
            }
        }
    }

    drop(listener);
    stop_tx.send_replace(());
    let grace = limits
        .header_read_timeout
        .saturating_add(limits.request_timeout);
    if tokio::time::timeout(grace, stop_tx.closed()).await.is_err() {
        tracing::warn!(
            remaining = stop_tx.receiver_count(),
            "closing HTTP connections still open after the shutdown grace period"
        );
    }
    Ok(())
}

/// What every connection task shares.
struct Server {
    builder: http1::Builder,
    service: RequestService,
    logs: Logs,
}

impl Server {
    /// Serves one admitted connection until it ends, upgrades, or the server stops.
    async fn connection(
        self: Arc<Self>,
        tcp: TcpStream,
        peer: SocketAddr,
        permit: Permit,
        mut stop: watch::Receiver<()>,
    ) {
        let io = TokioIo::new(CountedStream {
            inner: tcp,
            _permit: permit,
        });
        let conn = self
            .builder
            .serve_connection(io, self.service.clone())
            .with_upgrades();
        let mut conn = pin!(conn);
        loop {
            tokio::select! {
                result = conn.as_mut() => {
                    if let Err(e) = result {
                        self.logs.connection_error(peer, &e);
                    }
                    break;
                }
                changed = stop.changed() => match changed {
                    // The server stops: finish the request in progress, close when idle.
                    Ok(()) => conn.as_mut().graceful_shutdown(),
                    // The server is gone: close the connection now.
                    Err(_) => break,
                },
            }
        }
    }
}

/// The router behind hyper, with [`HttpLimits::request_timeout`] on every request.
#[derive(Clone)]
struct RequestService {
    inner: TowerToHyperService<Router>,
    timeout: Duration,
}

type ResponseFuture =
    Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send + 'static>>;

impl hyper::service::Service<Request<Incoming>> for RequestService {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = ResponseFuture;

    fn call(&self, request: Request<Incoming>) -> Self::Future {
        let response = self.inner.call(request);
        let timeout = self.timeout;
        Box::pin(async move {
            match tokio::time::timeout(timeout, response).await {
                Ok(response) => response,
                // Dropping the handler drops the request body too, so hyper stops reading
                // it; `connection: close` ends the connection after this answer.
                Err(_) => Ok(error_response(
                    StatusCode::REQUEST_TIMEOUT,
                    &format!("the request took longer than {} ms", timeout.as_millis()),
                )),
            }
        })
    }
}

/// A JSON error answer that closes the connection.
fn error_response(status: StatusCode, message: &str) -> Response<Body> {
    let mut response = Response::new(Body::from(error_body(message)));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

fn error_body(message: &str) -> String {
    serde_json::json!({ "error": message }).to_string()
}

/// Why a connection was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// [`HttpLimits::max_connections`] connections are open.
    #[error("too many connections to this server (limit {limit})")]
    TooManyConnections {
        /// The cap in force.
        limit: usize,
    },
    /// [`HttpLimits::max_connections_per_address`] connections are open from this address.
    #[error("too many connections from your address (limit {limit})")]
    TooManyFromAddress {
        /// The cap in force.
        limit: usize,
    },
}

/// Answers a refused connection with `503` without ever waiting in the accept loop.
///
/// The answer fits in the socket's fresh send buffer, so it is written without waiting. The
/// socket then stays open a moment in its own task (up to [`MAX_LINGERING_REFUSALS`] at
/// once) with its sending side shut, while what the client sent is read and dropped:
/// closing a socket with unread input resets it, and the reset can destroy the answer
/// before the client reads it.
fn refuse(tcp: TcpStream, refusal: &Refusal, lingering: &Arc<AtomicUsize>) {
    let body = error_body(&refusal.to_string());
    let response = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nconnection: close\r\nretry-after: 1\r\n\r\n{body}",
        body.len()
    );
    match tcp.try_write(response.as_bytes()) {
        Ok(written) if written == response.len() => {}
        // The client is gone, or not reading: nothing more to do for it.
        _ => return,
    }
    if lingering.fetch_add(1, Ordering::AcqRel) >= MAX_LINGERING_REFUSALS {
        lingering.fetch_sub(1, Ordering::AcqRel);
        return;
    }
    let lingering = Arc::clone(lingering);
    tokio::spawn(async move {
        let mut tcp = tcp;
        let _ = tokio::time::timeout(REFUSAL_LINGER, async {
            tcp.shutdown().await?;
            let mut sink = [0u8; 1024];
            while tcp.read(&mut sink).await? > 0 {}
            Ok::<_, io::Error>(())
        })
        .await;
        drop(tcp);
        lingering.fetch_sub(1, Ordering::AcqRel);
    });
}

fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

/// Counts open connections, in total and per client address.
#[derive(Debug)]
struct Tracker {
    max_total: usize,
    max_per_address: usize,
    total: AtomicUsize,
    per_address: Mutex<HashMap<IpAddr, usize>>,
}

impl Tracker {
    fn new(max_total: usize, max_per_address: usize) -> Self {
        Self {
            max_total,
            max_per_address,
            total: AtomicUsize::new(0),
            per_address: Mutex::new(HashMap::new()),
        }
    }

    /// Counts a new connection from `ip`, or says which cap it would exceed.
    fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Permit, Refusal> {
        let max_total = self.max_total;
        let admitted = self
            .total
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (max_total == 0 || n < max_total).then_some(n + 1)
            });
        if admitted.is_err() {
            return Err(Refusal::TooManyConnections { limit: max_total });
        }
        // From here on the permit releases what was counted, on refusal too.
        let mut permit = Permit {
            tracker: Arc::clone(self),
            address: None,
        };
        if self.max_per_address > 0 {
            let key = address_key(ip);
            let mut counts = self.counts();
            let count = counts.entry(key).or_insert(0);
            if *count >= self.max_per_address {
                return Err(Refusal::TooManyFromAddress {
                    limit: self.max_per_address,
                });
            }
            *count += 1;
            permit.address = Some(key);
        }
        Ok(permit)
    }

    fn counts(&self) -> MutexGuard<'_, HashMap<IpAddr, usize>> {
        // The map stays consistent under a panic elsewhere: every change is one statement.
        self.per_address
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn release(&self, address: Option<IpAddr>) {
        if let Some(key) = address {
            let mut counts = self.counts();
            if let Some(count) = counts.get_mut(&key) {
                *count = count.saturating_sub(1);
                if *count == 0 {
                    counts.remove(&key);
                }
            }
        }
        self.total.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The key a client address is counted under: the IPv4 address (IPv4-mapped IPv6
/// addresses included), or the `/64` network of an IPv6 address.
fn address_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => {
            let network = u128::from(v6) & !u128::from(u64::MAX);
            IpAddr::V6(Ipv6Addr::from(network))
        }
    }
}

/// One counted connection; dropping it releases its place in the caps.
#[derive(Debug)]
struct Permit {
    tracker: Arc<Tracker>,
    address: Option<IpAddr>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.tracker.release(self.address.take());
    }
}

/// An accepted socket that holds its [`Permit`]: the permit lives exactly as long as the
/// socket, through a WebSocket upgrade too (hyper's `Upgraded` owns this stream).
#[derive(Debug)]
struct CountedStream {
    inner: TcpStream,
    _permit: Permit,
}

impl AsyncRead for CountedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for CountedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Rate limits of the log lines that clients can cause.
#[derive(Debug)]
struct Logs {
    refused: Throttle,
    header_timeout: Throttle,
    other: Throttle,
}

impl Default for Logs {
    fn default() -> Self {
        Self {
            refused: Throttle::new(1, CLIENT_LOG_INTERVAL),
            header_timeout: Throttle::new(1, CLIENT_LOG_INTERVAL),
            other: Throttle::new(1, CLIENT_LOG_INTERVAL),
        }
    }
}

impl Logs {
    fn connection_error(&self, peer: SocketAddr, error: &hyper::Error) {
        if error.is_timeout() {
            if let Some(suppressed) = self.header_timeout.allow() {
                tracing::info!(
                    peer = %peer.ip(),
                    suppressed,
                    "closed a connection that sent no complete request head in time"
                );
            }
        } else if let Some(suppressed) = self.other.allow() {
            tracing::debug!(peer = %peer.ip(), suppressed, error = %error, "HTTP connection failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    #[test]
    fn the_default_cap_keeps_a_reserve_of_file_descriptors() {
        assert_eq!(connections_for_open_files(1024), 768);
        assert_eq!(connections_for_open_files(20_000), 19_744);
        assert_eq!(connections_for_open_files(300), 150);
        assert_eq!(connections_for_open_files(0), 1);
        assert!(default_max_connections() > 0);
    }

    #[test]
    fn ipv6_clients_are_counted_by_their_64_network() {
        let ip = |text: &str| text.parse::<IpAddr>().expect("an IP address");
        let (a, b, c) = (
            ip("2001:db8:1:2:aaaa::1"),
            ip("2001:db8:1:2:bbbb::2"),
            ip("2001:db8:1:3::1"),
        );
        assert_eq!(address_key(a), address_key(b));
        assert_ne!(address_key(a), address_key(c));
        let mapped = IpAddr::V6(Ipv4Addr::new(192, 0, 2, 7).to_ipv6_mapped());
        assert_eq!(address_key(mapped), IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7)));
    }

    #[test]
    fn the_caps_count_and_release() {
        let tracker = Arc::new(Tracker::new(3, 2));
        let one = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1));
        let two = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2));
        let first = tracker.admit(one);
        let second = tracker.admit(one);
        assert!(first.is_ok() && second.is_ok());
        assert_eq!(
            tracker.admit(one).err(),
            Some(Refusal::TooManyFromAddress { limit: 2 })
        );
        let third = tracker.admit(two);
        assert!(third.is_ok());
        assert_eq!(
            tracker.admit(two).err(),
            Some(Refusal::TooManyConnections { limit: 3 })
        );
        drop(first);
        assert!(tracker.admit(one).is_ok(), "a released place is free again");
        drop((second, third));
        assert_eq!(tracker.total.load(Ordering::Acquire), 0);
        assert!(tracker.counts().is_empty());
    }

    #[test]
    fn zero_means_unlimited() {
        let tracker = Arc::new(Tracker::new(0, 0));
        let ip = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let permits: Vec<_> = (0..100).map(|_| tracker.admit(ip)).collect();
        assert!(permits.iter().all(Result::is_ok));
        assert!(tracker.counts().is_empty());
    }
}
