//! A real Switchboard server on a loopback port, and a raw WebSocket client that speaks the
//! JSON hub protocol frame by frame.

#![allow(
    dead_code,
    reason = "each test binary uses a different part of the harness"
)]

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use switchboard::app::{self, AppOptions};
use switchboard::auth::{Authenticator, JwtConfig};
use switchboard::http::HttpLimits;
use switchboard::hub::Hub;
use switchboard::{HubOptions, HubService, chat};
use switchboard_core::testkit::ReferenceStore;
use switchboard_core::{
    Backplane, Capabilities, ConnectionId, ConnectionRecord, ConnectionStore, Counts, NodeId,
    PageRequest, Removal, StoreError, UserId, UserPage, async_trait,
};
use switchboard_memory::MemoryStore;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// The secret every test server signs tokens with.
pub const SECRET: &str = "switchboard-test-secret-0123456789abcdef";

/// How long a test waits for anything before failing instead of hanging.
pub const PATIENCE: Duration = Duration::from_secs(10);

pub struct TestServer {
    pub addr: SocketAddr,
    pub auth: Authenticator,
    pub hub: HubService,
    pub store: Arc<dyn ConnectionStore>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<JoinHandle<std::io::Result<()>>>,
}

impl TestServer {
    /// The chat hub on a memory store.
    pub async fn start(options: HubOptions) -> Self {
        Self::start_with(chat::hub(), Arc::new(MemoryStore::new()), options).await
    }

    /// Any hub on any store.
    pub async fn start_with(
        hub: Hub,
        store: Arc<dyn ConnectionStore>,
        options: HubOptions,
    ) -> Self {
        Self::start_full(hub, store, options, HttpLimits::default()).await
    }

    /// The chat hub on a memory store, behind `limits`.
    pub async fn start_limited(limits: HttpLimits) -> Self {
        Self::start_full(
            chat::hub(),
            Arc::new(MemoryStore::new()),
            HubOptions::default(),
            limits,
        )
        .await
    }

    /// The chat hub, serving the browser client from `vendor_dir`.
    pub async fn start_vendor(vendor_dir: std::path::PathBuf) -> Self {
        Self::start_inner(
            chat::hub(),
            Arc::new(MemoryStore::new()),
            HubOptions::default(),
            HttpLimits::default(),
            Some(vendor_dir),
        )
        .await
    }

    /// Any hub on any store, behind `limits`.
    pub async fn start_full(
        hub: Hub,
        store: Arc<dyn ConnectionStore>,
        options: HubOptions,
        limits: HttpLimits,
    ) -> Self {
        Self::start_inner(hub, store, options, limits, None).await
    }

    /// Any hub as node `node` of a cluster, sharing `store` and `backplane`.
    pub async fn start_node_with(
        hub: Hub,
        node: NodeId,
        store: Arc<dyn ConnectionStore>,
        backplane: Option<Arc<dyn Backplane>>,
        options: HubOptions,
    ) -> Self {
        Self::start_any(
            hub,
            store,
            options,
            HttpLimits::default(),
            None,
            Some(node),
            backplane,
        )
        .await
    }

    /// The chat hub as node `node` of a cluster: sharing `store` (and `backplane`, if any)
    /// with other nodes in this process.
    pub async fn start_node(
        node: NodeId,
        store: Arc<dyn ConnectionStore>,
        backplane: Option<Arc<dyn Backplane>>,
        options: HubOptions,
    ) -> Self {
        Self::start_node_with(chat::hub(), node, store, backplane, options).await
    }

    async fn start_inner(
        hub: Hub,
        store: Arc<dyn ConnectionStore>,
        options: HubOptions,
        limits: HttpLimits,
        vendor_dir: Option<std::path::PathBuf>,
    ) -> Self {
        Self::start_any(hub, store, options, limits, vendor_dir, None, None).await
    }

    async fn start_any(
        hub: Hub,
        store: Arc<dyn ConnectionStore>,
        options: HubOptions,
        limits: HttpLimits,
        vendor_dir: Option<std::path::PathBuf>,
        node: Option<NodeId>,
        backplane: Option<Arc<dyn Backplane>>,
    ) -> Self {
        let auth = Authenticator::new(JwtConfig::new(SECRET).expect("strong secret"));
        let node = node.unwrap_or_else(|| {
            switchboard::service::fresh_node_id("test-node").expect("valid prefix")
        });
        let mut builder = HubService::builder(hub, store.clone(), auth.clone())
            .node(node)
            .options(options);
        if let Some(backplane) = backplane {
            builder = builder.backplane(backplane);
        }
        let service = builder.build();
        service.start().await.expect("the hub starts");
        let router = app::router(
            &service,
            &auth,
            &AppOptions {
                dev_tokens: true,
                vendor_dir,
                admin: None,
            },
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind loopback");
        let addr = listener.local_addr().expect("local addr");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(app::serve_with_limits(
            listener,
            router,
            vec![service.clone()],
            limits,
            async move {
                let _ = stopped.await;
            },
        ));
        Self {
            addr,
            auth,
            hub: service,
            store,
            stop: Some(stop),
            task: Some(task),
        }
    }

    pub fn token(&self, user: &str) -> String {
        self.auth.issue(
            &UserId::new(user).expect("valid user"),
            Duration::from_secs(600),
        )
    }

    pub fn ws_url(&self, query: &str) -> String {
        format!("ws://{}{}{}", self.addr, chat::PATH, query)
    }

    /// Opens a WebSocket with the token in the Authorization header (skipNegotiation style
    /// when `query` has no `id`). Returns the HTTP status on refusal.
    pub async fn open(&self, query: &str, token: Option<&str>) -> Result<RawClient, u16> {
        open_ws(self.addr, query, token).await
    }

    /// A connected, handshaken client of `user` whose socket has a small receive buffer, so
    /// that a client reading slowly holds back the server's writes soon.
    pub async fn connect_with_small_receive_buffer(&self, user: &str) -> RawClient {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.set_recv_buffer_size(4096).expect("receive buffer");
        let stream = socket.connect(self.addr).await.expect("connect");
        let mut request = self
            .ws_url("")
            .into_client_request()
            .expect("valid request");
        request.headers_mut().insert(
            "authorization",
            format!("Bearer {}", self.token(user))
                .parse()
                .expect("header value"),
        );
        let (ws, _) = tokio::time::timeout(
            PATIENCE,
            tokio_tungstenite::client_async(request, MaybeTlsStream::Plain(stream)),
        )
        .await
        .expect("connect in time")
        .expect("upgrade");
        let mut client = RawClient { ws };
        client.handshake().await;
        client
    }

    /// A WebSocket of `user` before the handshake (skipNegotiation).
    pub async fn open_as(&self, user: &str) -> RawClient {
        self.open("", Some(&self.token(user)))
            .await
            .expect("authorized")
    }

    /// The HTTP status refusing `user`'s WebSocket for connection token `token`, if refused.
    pub async fn attach_refusal(&self, token: &str, user: &str) -> Option<u16> {
        self.open(&format!("?id={token}"), Some(&self.token(user)))
            .await
            .err()
    }

    /// A connected, handshaken client of `user` (skipNegotiation).
    pub async fn connect(&self, user: &str) -> RawClient {
        let mut client = self
            .open("", Some(&self.token(user)))
            .await
            .expect("authorized");
        client.handshake().await;
        client
    }

    /// Waits until the store holds `expected` connections in total.
    pub async fn wait_for_connections(&self, expected: u64) {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let counts = self.store.counts().await.expect("counts");
            if counts.connections == expected {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "store holds {} connections, expected {expected}",
                counts.connections
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Sends a plain HTTP/1.1 request; returns status and body.
    pub async fn http(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> (u16, String) {
        let stream = TcpStream::connect(self.addr).await.expect("connect");
        self.http_over(stream, method, path, headers, body).await
    }

    /// Like [`TestServer::http`], from the loopback address `local` (Linux routes all of
    /// 127.0.0.0/8 to the loopback interface).
    pub async fn http_from(
        &self,
        local: IpAddr,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> (u16, String) {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket
            .bind(SocketAddr::new(local, 0))
            .expect("bind the local address");
        let stream = socket.connect(self.addr).await.expect("connect");
        self.http_over(stream, method, path, headers, body).await
    }

    async fn http_over(
        &self,
        stream: TcpStream,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> (u16, String) {
        http_request(stream, &self.addr.to_string(), method, path, headers, body).await
    }

    /// Negotiates (version 1) as `user`; returns the JSON answer.
    pub async fn negotiate(&self, user: &str) -> Value {
        let auth = format!("Bearer {}", self.token(user));
        let (status, body) = self
            .http(
                "POST",
                &format!("{}/negotiate?negotiateVersion=1", chat::PATH),
                &[("authorization", &auth)],
                "",
            )
            .await;
        assert_eq!(status, 200, "negotiate failed: {body}");
        serde_json::from_str(&body).expect("negotiate JSON")
    }

    /// Stops the server (graceful shutdown) and waits for it.
    pub async fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(PATIENCE, task)
                .await
                .expect("server stops in time")
                .expect("server task")
                .expect("server I/O");
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// Sends a plain HTTP/1.1 request on `stream` (closing after it); returns status and body.
pub async fn http_request(
    mut stream: TcpStream,
    host: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String) {
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nhost: {}\r\nconnection: close\r\ncontent-length: {}\r\n",
        host,
        body.len()
    );
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    request.push_str(body);
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut response = Vec::new();
    tokio::time::timeout(PATIENCE, stream.read_to_end(&mut response))
        .await
        .expect("HTTP response in time")
        .expect("read");
    let text = String::from_utf8_lossy(&response).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status line");
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// One frame as the client saw it.
#[derive(Debug)]
pub enum Frame {
    Records(Vec<Value>),
    Binary,
    Closed,
}

/// Opens a WebSocket to the chat hub at `addr` with the token in the Authorization header
/// (skipNegotiation style when `query` has no `id`). Returns the HTTP status on refusal.
pub async fn open_ws(addr: SocketAddr, query: &str, token: Option<&str>) -> Result<RawClient, u16> {
    let mut request = format!("ws://{addr}{}{query}", chat::PATH)
        .into_client_request()
        .expect("valid request");
    if let Some(token) = token {
        request.headers_mut().insert(
            "authorization",
            format!("Bearer {token}").parse().expect("header value"),
        );
    }
    match tokio::time::timeout(PATIENCE, tokio_tungstenite::connect_async(request)).await {
        Err(_) => panic!("WebSocket connect timed out"),
        Ok(Ok((ws, _))) => Ok(RawClient { ws }),
        Ok(Err(tungstenite::Error::Http(response))) => Err(response.status().as_u16()),
        Ok(Err(e)) => panic!("WebSocket connect failed: {e}"),
    }
}

pub struct RawClient {
    pub ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

impl RawClient {
    pub async fn send_text(&mut self, text: &str) {
        self.ws
            .send(Message::text(text))
            .await
            .expect("send text frame");
    }

    /// Sends one record (the separator is appended).
    pub async fn send_record(&mut self, json: &str) {
        self.send_text(&format!("{json}\u{1e}")).await;
    }

    pub async fn handshake(&mut self) {
        self.send_record(r#"{"protocol":"json","version":1}"#).await;
        let reply = self.next_text().await.expect("handshake reply");
        assert_eq!(reply, "{}\u{1e}", "handshake must succeed");
    }

    /// The next text frame, skipping control frames; `None` once the connection closed.
    pub async fn next_text(&mut self) -> Option<String> {
        loop {
            let frame = tokio::time::timeout(PATIENCE, self.ws.next())
                .await
                .expect("a frame (or close) in time");
            match frame {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return None,
                Some(Ok(Message::Text(text))) => return Some(text.to_string()),
                Some(Ok(Message::Binary(_))) => panic!("the server sent a binary frame"),
                Some(Ok(_)) => continue,
            }
        }
    }

    /// The records of the next text frame (asserting every frame ends on a separator).
    pub async fn next_records(&mut self) -> Option<Vec<Value>> {
        let text = self.next_text().await?;
        assert!(
            text.ends_with('\u{1e}'),
            "frames must end on a record boundary: {text:?}"
        );
        Some(
            text.split('\u{1e}')
                .filter(|r| !r.is_empty())
                .map(|r| serde_json::from_str(r).expect("server records are JSON"))
                .collect(),
        )
    }

    /// The next record that is not a Ping.
    pub async fn next_message(&mut self) -> Option<Value> {
        loop {
            for record in self.next_records().await? {
                if record["type"] != 6 {
                    return Some(record);
                }
            }
        }
    }

    /// Expects a Close message (returns it), then the end of the socket.
    pub async fn expect_close(&mut self) -> Value {
        let close = self.next_message().await.expect("a Close message");
        assert_eq!(close["type"], 7, "expected a Close message, got {close}");
        assert!(
            self.next_text().await.is_none(),
            "the socket must close after the Close message"
        );
        close
    }

    /// Expects a Close message carrying an error, then the end of the socket; returns the error.
    pub async fn close_error(&mut self) -> String {
        let close = self.expect_close().await;
        close["error"]
            .as_str()
            .unwrap_or_else(|| panic!("the Close message has no error: {close}"))
            .to_owned()
    }

    /// Invokes `target` with an id and returns its Completion, skipping anything else.
    pub async fn invoke(&mut self, id: &str, target: &str, args: Value) -> Value {
        let record =
            serde_json::json!({"type": 1, "invocationId": id, "target": target, "arguments": args});
        self.send_record(&record.to_string()).await;
        loop {
            let message = self.next_message().await.expect("a Completion");
            if message["type"] == 3 && message["invocationId"] == id {
                return message;
            }
            assert_ne!(
                message["type"], 7,
                "the connection closed while waiting for the Completion of {target}: {message}"
            );
        }
    }
}

/// A token with exactly this header and these claims (JSON text), signed with [`SECRET`].
pub fn sign_raw(header: &str, claims: &str) -> String {
    use base64::Engine as _;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use hmac::Mac as _;
    let input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header),
        URL_SAFE_NO_PAD.encode(claims)
    );
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(SECRET.as_bytes()).expect("any key");
    mac.update(input.as_bytes());
    format!(
        "{input}.{}",
        URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
    )
}

/// Negotiates as `user`, asking for stateful reconnect; returns the answer.
pub async fn ask_for_stateful(server: &TestServer, user: &str) -> Value {
    let auth = format!("Bearer {}", server.token(user));
    let (status, body) = server
        .http(
            "POST",
            "/hubs/chat/negotiate?negotiateVersion=1&useStatefulReconnect=true",
            &[("authorization", &auth)],
            "",
        )
        .await;
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).expect("JSON")
}

/// Negotiates stateful reconnect as `user`; returns the connection token.
pub async fn negotiate_stateful(server: &TestServer, user: &str) -> String {
    let answer = ask_for_stateful(server, user).await;
    assert_eq!(answer["useStatefulReconnect"], true);
    answer["connectionToken"]
        .as_str()
        .expect("token")
        .to_owned()
}

/// Negotiates stateful reconnect as `user`, attaches and handshakes with version 2.
pub async fn connect_stateful(server: &TestServer, user: &str) -> (String, RawClient) {
    let token = negotiate_stateful(server, user).await;
    let mut client = attach(server, user, &token).await;
    client
        .send_record(r#"{"protocol":"json","version":2}"#)
        .await;
    assert_eq!(client.next_text().await.as_deref(), Some("{}\u{1e}"));
    (token, client)
}

pub async fn attach(server: &TestServer, user: &str, token: &str) -> RawClient {
    server
        .open(&format!("?id={token}"), Some(&server.token(user)))
        .await
        .expect("attach")
}

/// A store that can be switched off, like a database that went away (or a node cut off from
/// a shared one), or made slow to record connections, like one across a network. By default
/// it wraps a memory store of its own; [`FlakyStore::over`] puts it in front of a shared one.
#[derive(Debug)]
pub struct FlakyStore {
    pub inner: Arc<dyn ConnectionStore>,
    pub down: AtomicBool,
    pub slow_adds: AtomicBool,
    /// Every call waits forever, like a database that stopped answering.
    pub hung: AtomicBool,
    /// New connections are refused by policy.
    pub refusing: AtomicBool,
    /// New connections fail with a permanent error.
    pub broken: AtomicBool,
    /// Claims `shared_across_nodes`: one instance shared by several nodes in this process
    /// stands in for a shared database.
    claims_shared: bool,
}

impl Default for FlakyStore {
    fn default() -> Self {
        Self::over(Arc::new(MemoryStore::new()))
    }
}

impl FlakyStore {
    /// In front of `inner`, all switches off.
    pub fn over(inner: Arc<dyn ConnectionStore>) -> Self {
        Self {
            inner,
            down: AtomicBool::new(false),
            slow_adds: AtomicBool::new(false),
            hung: AtomicBool::new(false),
            refusing: AtomicBool::new(false),
            broken: AtomicBool::new(false),
            claims_shared: false,
        }
    }

    /// One store for several nodes in this process, standing in for a shared database: it
    /// claims `shared_across_nodes`, which a server wants before it accepts a backplane.
    pub fn shared(inner: Arc<dyn ConnectionStore>) -> Self {
        Self {
            claims_shared: true,
            ..Self::over(inner)
        }
    }

    async fn check(&self) -> Result<(), StoreError> {
        if self.hung.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        if self.down.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable {
                message: "connection refused".into(),
                source: None,
            });
        }
        Ok(())
    }
}

#[async_trait]
impl ConnectionStore for FlakyStore {
    fn capabilities(&self) -> Capabilities {
        let mut caps = self.inner.capabilities();
        caps.shared_across_nodes |= self.claims_shared;
        caps
    }
    async fn add(&self, record: ConnectionRecord) -> Result<(), StoreError> {
        self.check().await?;
        if self.refusing.load(Ordering::SeqCst) {
            return Err(StoreError::refused("You are banned from this chat."));
        }
        if self.broken.load(Ordering::SeqCst) {
            return Err(StoreError::Corrupt("a bad row".into()));
        }
        if self.slow_adds.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.inner.add(record).await
    }
    async fn remove(&self, user: &UserId, id: &ConnectionId) -> Result<Removal, StoreError> {
        self.check().await?;
        self.inner.remove(user, id).await
    }
    async fn reconnect(&self, record: ConnectionRecord) -> Result<(), StoreError> {
        self.check().await?;
        self.inner.reconnect(record).await
    }
    async fn connections(&self, user: &UserId) -> Result<Vec<ConnectionRecord>, StoreError> {
        self.check().await?;
        self.inner.connections(user).await
    }
    async fn users(&self, page: PageRequest) -> Result<UserPage, StoreError> {
        self.check().await?;
        self.inner.users(page).await
    }
    /// Answers even while down, so tests can watch the store.
    async fn counts(&self) -> Result<Counts, StoreError> {
        self.inner.counts().await
    }
    async fn counts_by_node(
        &self,
    ) -> Result<std::collections::BTreeMap<switchboard_core::NodeId, u64>, StoreError> {
        self.inner.counts_by_node().await
    }
    async fn heartbeat(
        &self,
        node: &switchboard_core::NodeId,
        ttl: Duration,
    ) -> Result<switchboard_core::Lease, StoreError> {
        self.check().await?;
        self.inner.heartbeat(node, ttl).await
    }
    async fn sweep(&self) -> Result<u64, StoreError> {
        self.check().await?;
        self.inner.sweep().await
    }
    async fn release(&self, node: &switchboard_core::NodeId) -> Result<u64, StoreError> {
        self.check().await?;
        self.inner.release(node).await
    }
}

/// Waits until `check` holds, polling; fails the test after [`PATIENCE`].
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The next `n` messages of a client that are not Pings.
pub async fn messages(client: &mut RawClient, n: usize) -> Vec<Value> {
    let mut out = Vec::new();
    while out.len() < n {
        out.push(client.next_message().await.expect("a message"));
    }
    out
}

/// Everything but Pings a client receives until the Completion of `id`, that Completion
/// included.
pub async fn until_completion(client: &mut RawClient, id: &str) -> Vec<Value> {
    let mut out = Vec::new();
    loop {
        let message = client.next_message().await.expect("a message");
        let done = message["type"] == 3 && message["invocationId"] == id;
        out.push(message);
        if done {
            return out;
        }
    }
}

/// The `addChatMessage` invocation a chat client receives for `text`.
pub fn chat(text: &str) -> Value {
    serde_json::json!({"type": 1, "target": "addChatMessage", "arguments": [text]})
}

/// The reference store, claiming it cannot look users up (and has no leases) and spans nodes
/// through a backplane, as the `groups` strategy (one instance may serve several nodes of a
/// test, so the test can count what they hold): the server then delivers to users through its per-user index and, with a
/// backplane, through per-user channels.
#[derive(Debug, Default)]
pub struct NoLookupStore(pub ReferenceStore);

#[async_trait]
impl ConnectionStore for NoLookupStore {
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            lookup: false,
            leases: false,
            shared_across_nodes: false,
            spans_nodes_with_backplane: true,
            ..self.0.capabilities()
        }
    }
    async fn add(&self, record: ConnectionRecord) -> Result<(), StoreError> {
        self.0.add(record).await
    }
    async fn remove(&self, user: &UserId, id: &ConnectionId) -> Result<Removal, StoreError> {
        self.0.remove(user, id).await
    }
    async fn reconnect(&self, record: ConnectionRecord) -> Result<(), StoreError> {
        self.0.reconnect(record).await
    }
    async fn counts(&self) -> Result<switchboard_core::Counts, StoreError> {
        self.0.counts().await
    }
    async fn counts_by_node(
        &self,
    ) -> Result<std::collections::BTreeMap<switchboard_core::NodeId, u64>, StoreError> {
        self.0.counts_by_node().await
    }
}

/// A free port on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A `switchboard serve` process (the test binary's own build) on a free loopback port,
/// killed with SIGKILL when dropped: for crash tests, which an in-process server cannot do.
pub struct ServerProcess {
    /// Where it listens.
    pub addr: SocketAddr,
    child: std::process::Child,
    auth: Authenticator,
}

impl ServerProcess {
    /// Starts `switchboard serve <args> --node-lease <lease_seconds>` with `envs` set, and
    /// waits until `/readyz` answers 200.
    pub async fn start(args: &[&str], envs: &[(&str, String)], lease_seconds: u64) -> Self {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port())
            .parse()
            .expect("an address");
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_switchboard"))
            .arg("serve")
            .args(args)
            .envs(envs.iter().map(|(k, v)| (*k, v.as_str())))
            .args(["--node-lease", &lease_seconds.to_string()])
            .args(["--jwt-secret", SECRET, "--listen", &addr.to_string()])
            .env("SWITCHBOARD_LOG", "warn")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .expect("the server starts");
        let auth =
            Authenticator::new(JwtConfig::new(SECRET.as_bytes().to_vec()).expect("a secret"));
        let server = Self { addr, child, auth };
        eventually("the server answers /readyz", || async {
            match TcpStream::connect(server.addr).await {
                Ok(stream) => {
                    let host = server.addr.to_string();
                    http_request(stream, &host, "GET", "/readyz", &[], "")
                        .await
                        .0
                        == 200
                }
                Err(_) => false,
            }
        })
        .await;
        server
    }

    /// A connected, handshaken client of `user`.
    pub async fn connect(&self, user: &str) -> RawClient {
        let token = self
            .auth
            .issue(&UserId::new(user).expect("valid"), Duration::from_secs(600));
        let mut client = open_ws(self.addr, "", Some(&token))
            .await
            .expect("authorized");
        client.handshake().await;
        client
    }

    /// Kills the process at once (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Sends `SendChatMessage(who, text)` with invocation id `id` and answers everything the
/// client received up to and including its completion.
pub async fn send_chat(client: &mut RawClient, id: &str, who: &str, text: &str) -> Vec<Value> {
    let record = serde_json::json!({"type": 1, "invocationId": id, "target": "SendChatMessage", "arguments": [who, text]});
    client.send_record(&record.to_string()).await;
    until_completion(client, id).await
}

/// The `showErrorMessage` a sender gets for a user with no connection.
pub fn not_connected(who: &str) -> Value {
    serde_json::json!({"type": 1, "target": "showErrorMessage", "arguments": [format!("The user '{who}' is not connected.")]})
}

/// What clients of `server` must see while its store is down: `sender`'s message to
/// `target` is answered within `bound` with an error (never "not connected", never a hang),
/// `leaving` can close, and `newcomer`'s new connection is closed at once as unavailable
/// with an invitation to reconnect.
pub async fn check_outage_answers(
    server: &TestServer,
    sender: &mut RawClient,
    target: &str,
    leaving: RawClient,
    newcomer: &str,
    bound: Duration,
) {
    let started = tokio::time::Instant::now();
    let answer = send_chat(sender, "1", target, "during").await;
    assert!(
        started.elapsed() < bound,
        "the send took {:?}",
        started.elapsed()
    );
    let text = answer[0].to_string();
    assert!(
        answer[0]["target"] == "showErrorMessage" || answer[0]["error"].is_string(),
        "an error for the caller: {answer:?}"
    );
    assert!(
        !text.contains("not connected"),
        "{target} is not reported gone: {text}"
    );
    // The leaving client closes during the outage: its removal waits for the store.
    let mut leaving = leaving;
    drop(leaving.ws.close(None).await);
    // A new connection is closed at once with a reason and an invitation to reconnect later
    // (the failure is transient), not left hanging.
    let mut newcomer = open_ws(server.addr, "", Some(&server.token(newcomer)))
        .await
        .expect("the upgrade needs no store");
    newcomer
        .send_record(r#"{"protocol":"json","version":1}"#)
        .await;
    assert_eq!(newcomer.next_text().await.as_deref(), Some("{}\u{1e}"));
    let close = newcomer.expect_close().await;
    assert_eq!(close["allowReconnect"], true, "{close}");
    assert!(
        close["error"]
            .as_str()
            .is_some_and(|e| e.contains("unavailable")),
        "{close}"
    );
}
