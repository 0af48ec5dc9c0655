//! The `switchboard` binary.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use switchboard::access::{AdminAccess, AdminClaim};
use switchboard::app::{self, AppOptions};
use switchboard::auth::{Authenticator, JwtConfig};
use switchboard::http::{self, HttpLimits};
use switchboard::logs::{self, LogFormat};
use switchboard::stores::{self, BackplaneKind, BackplaneSettings, StoreKind, StoreSettings};
use switchboard::{HubOptions, HubService, chat};
use switchboard_core::{Capabilities, NodeId};
use tracing_subscriber::EnvFilter;

/// Switchboard: a SignalR-compatible hub server that knows which user is behind which
/// connection.
#[derive(Debug, Parser)]
#[command(name = "switchboard", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the server: the chat hub at /hubs/chat and the chat page at /.
    Serve(Box<ServeArgs>),
    /// Print the capability table of the stores compiled into this build (Markdown).
    Capabilities,
    /// List the connected users, read from the configured store (stores that outlive the
    /// server: sql, azure).
    Users(ListArgs),
    /// List one user's live connections, read from the configured store.
    Connections(ConnectionsArgs),
}

/// Which store, and how to reach it: the same flags for `serve`, `users` and `connections`.
#[derive(Debug, Args)]
struct StoreArgs {
    /// Where connections are recorded.
    #[arg(long, env = "SWITCHBOARD_STORE", value_enum, default_value_t = StoreKind::Memory)]
    store: StoreKind,
    /// Database of `--store sql`: sqlite://switchboard.db (one machine; created if missing),
    /// or postgres://user:password@host:port/database (many servers). Also the PostgreSQL
    /// of `--backplane postgres`.
    #[arg(long, env = "SWITCHBOARD_DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
    /// PostgreSQL schema that holds the sql store's tables (created if missing).
    #[arg(long, env = "SWITCHBOARD_DATABASE_SCHEMA", default_value = stores::DEFAULT_DATABASE_SCHEMA)]
    database_schema: String,
    /// Most connections the sql store opens to its database.
    #[arg(
        long,
        env = "SWITCHBOARD_DATABASE_POOL_SIZE",
        default_value_t = stores::DEFAULT_DATABASE_POOL_SIZE,
        value_parser = clap::value_parser!(u32).range(1..)
    )]
    database_pool_size: u32,
    /// Seconds a store operation waits for a database connection before it fails as
    /// unavailable (how fast a database that went away is noticed).
    #[arg(
        long,
        env = "SWITCHBOARD_DATABASE_ACQUIRE_TIMEOUT",
        default_value_t = stores::DEFAULT_DATABASE_ACQUIRE_TIMEOUT.as_secs_f64()
    )]
    database_acquire_timeout: f64,
    /// Storage account of `--store azure`: its connection string
    /// (DefaultEndpointsProtocol=https;AccountName=...;AccountKey=...;EndpointSuffix=..., or
    /// with TableEndpoint=...), or UseDevelopmentStorage=true for Azurite on its default
    /// port. Never printed.
    #[arg(
        long,
        env = "SWITCHBOARD_AZURE_CONNECTION_STRING",
        hide_env_values = true
    )]
    azure_connection_string: Option<String>,
    /// Table that holds the azure store's records (created if missing): 3-63 letters and
    /// digits, starting with a letter.
    #[arg(long, env = "SWITCHBOARD_AZURE_TABLE", default_value = stores::DEFAULT_AZURE_TABLE)]
    azure_table: String,
    /// Seconds one request of the azure store may take before it counts as failed (and is
    /// retried).
    #[arg(
        long,
        env = "SWITCHBOARD_AZURE_REQUEST_TIMEOUT",
        default_value_t = stores::DEFAULT_AZURE_REQUEST_TIMEOUT.as_secs_f64()
    )]
    azure_request_timeout: f64,
    /// Seconds an operation of the azure store retries transient failures (unreachable,
    /// timeouts, 500, 503) before it fails; 0 tries once.
    #[arg(
        long,
        env = "SWITCHBOARD_AZURE_RETRY_BUDGET",
        default_value_t = stores::DEFAULT_AZURE_RETRY_BUDGET.as_secs_f64()
    )]
    azure_retry_budget: f64,
    /// Requests the azure store sends at the same time; more wait for a turn (within the
    /// request timeout).
    #[arg(
        long,
        env = "SWITCHBOARD_AZURE_MAX_IN_FLIGHT",
        default_value_t = stores::DEFAULT_AZURE_MAX_IN_FLIGHT,
        value_parser = clap::value_parser!(u32).range(1..)
    )]
    azure_max_in_flight: u32,
}

impl StoreArgs {
    fn settings(&self) -> anyhow::Result<StoreSettings> {
        Ok(StoreSettings {
            database_url: self.database_url.clone(),
            database_schema: self.database_schema.clone(),
            database_pool_size: self.database_pool_size,
            database_acquire_timeout: seconds(
                self.database_acquire_timeout,
                "--database-acquire-timeout",
            )?,
            azure_connection_string: self.azure_connection_string.clone(),
            azure_table: self.azure_table.clone(),
            azure_request_timeout: seconds(self.azure_request_timeout, "--azure-request-timeout")?,
            azure_retry_budget: if self.azure_retry_budget == 0.0 {
                std::time::Duration::ZERO
            } else {
                seconds(self.azure_retry_budget, "--azure-retry-budget")?
            },
            azure_max_in_flight: usize::try_from(self.azure_max_in_flight).unwrap_or(usize::MAX),
        })
    }
}

#[derive(Debug, Args)]
struct ListArgs {
    #[command(flatten)]
    store: StoreArgs,
    /// Print JSON (an array of user ids) instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct ConnectionsArgs {
    /// The user, exactly as the token's user claim names them.
    user: String,
    #[command(flatten)]
    store: StoreArgs,
    /// Print JSON (an array of {id, node, user_agent, connected_at}) instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct ServeArgs {
    #[command(flatten)]
    store: StoreArgs,
    /// Address to listen on.
    #[arg(long, env = "SWITCHBOARD_LISTEN", default_value = "127.0.0.1:5000")]
    listen: SocketAddr,
    /// Log lines as readable text, or as one JSON object per line (with the node id on
    /// every line, and connection and user fields on lines about a connection). The level
    /// comes from SWITCHBOARD_LOG (default info).
    #[arg(long, env = "SWITCHBOARD_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Development mode: anyone can get a token from POST /auth/dev-token. Never in production.
    #[arg(long, env = "SWITCHBOARD_DEV")]
    dev: bool,
    /// HS256 secret that signs access tokens (at least 32 bytes). Required unless --dev.
    #[arg(long, env = "SWITCHBOARD_JWT_SECRET", hide_env_values = true)]
    jwt_secret: Option<String>,
    /// Required `iss` claim, if set.
    #[arg(long, env = "SWITCHBOARD_JWT_ISSUER")]
    jwt_issuer: Option<String>,
    /// Required `aud` claim, if set.
    #[arg(long, env = "SWITCHBOARD_JWT_AUDIENCE")]
    jwt_audience: Option<String>,
    /// The claim (name=value) a token needs to open /admin and read /metrics on the main
    /// listener; it matches a string claim, an array claim holding the value, or a
    /// space-separated list (like scope). --dev opens /admin to everyone.
    #[arg(long, env = "SWITCHBOARD_ADMIN_CLAIM", default_value = AdminClaim::DEFAULT)]
    admin_claim: AdminClaim,
    /// The token claim that names the user.
    #[arg(long, env = "SWITCHBOARD_USER_CLAIM", default_value = "sub")]
    user_claim: String,
    /// A readable prefix for this node's id; every start adds a fresh random suffix, so a
    /// restarted node never takes over its predecessor's records.
    #[arg(long, env = "SWITCHBOARD_NODE_ID", default_value = switchboard::service::DEFAULT_NODE_PREFIX)]
    node_id: String,
    /// Seconds of this node's lease in a store with leases: the node renews it every third;
    /// a crashed node's connections stop counting at most this long after its last renewal.
    #[arg(
        long,
        env = "SWITCHBOARD_NODE_LEASE",
        default_value_t = HubOptions::default().lease.as_secs(),
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    node_lease: u64,
    /// Removals from the store that failed and wait for a retry; past it the oldest is given
    /// up (logged).
    #[arg(long, env = "SWITCHBOARD_MAX_PENDING_REMOVALS", default_value_t = HubOptions::default().max_pending_removals)]
    max_pending_removals: usize,
    /// How messages reach connections on other nodes.
    #[arg(long, env = "SWITCHBOARD_BACKPLANE", value_enum, default_value_t = BackplaneKind::None)]
    backplane: BackplaneKind,
    /// Redis for `--backplane redis`: redis://host:port, redis://user:password@host:port/db,
    /// or rediss:// for TLS.
    #[arg(long, env = "SWITCHBOARD_REDIS_URL", hide_env_values = true)]
    redis_url: Option<String>,
    /// Prefix of every backplane channel and key (one per deployment sharing a broker).
    #[arg(long, env = "SWITCHBOARD_BACKPLANE_PREFIX", default_value = switchboard_core::ChannelNames::DEFAULT_PREFIX)]
    backplane_prefix: String,
    /// Largest message the backplane carries to another node, in bytes.
    #[arg(long, env = "SWITCHBOARD_BACKPLANE_MAX_PAYLOAD", default_value_t = 1 << 20)]
    backplane_max_payload: usize,
    /// Messages for other nodes that may wait while the broker is unreachable.
    #[arg(
        long,
        env = "SWITCHBOARD_BACKPLANE_BUFFER_MESSAGES",
        default_value_t = 10_000
    )]
    backplane_buffer_messages: usize,
    /// Bytes of messages for other nodes that may wait while the broker is unreachable.
    #[arg(long, env = "SWITCHBOARD_BACKPLANE_BUFFER_BYTES", default_value_t = 16 << 20)]
    backplane_buffer_bytes: usize,
    /// Seconds a message for other nodes may wait for the broker; then its sender is told it
    /// could not be delivered.
    #[arg(long, env = "SWITCHBOARD_BACKPLANE_BUFFER_AGE", default_value_t = 10.0)]
    backplane_buffer_age: f64,
    /// Directory with the SignalR browser client, served under /vendor/.
    #[arg(
        long,
        env = "SWITCHBOARD_VENDOR_DIR",
        default_value = "web/node_modules/@microsoft/signalr/dist/browser"
    )]
    vendor_dir: PathBuf,
    /// Largest accepted message (one record), in bytes.
    #[arg(long, env = "SWITCHBOARD_MAX_MESSAGE_SIZE", default_value_t = HubOptions::default().max_record_size)]
    max_message_size: usize,
    /// Seconds of send-silence before the server sends a Ping.
    #[arg(long, env = "SWITCHBOARD_KEEP_ALIVE", default_value_t = HubOptions::default().keep_alive_interval.as_secs())]
    keep_alive: u64,
    /// Seconds without any message before a client is dropped.
    #[arg(long, env = "SWITCHBOARD_CLIENT_TIMEOUT", default_value_t = HubOptions::default().client_timeout.as_secs())]
    client_timeout: u64,
    /// Seconds a new connection has to send its handshake.
    #[arg(long, env = "SWITCHBOARD_HANDSHAKE_TIMEOUT", default_value_t = HubOptions::default().handshake_timeout.as_secs())]
    handshake_timeout: u64,
    /// Seconds a client has to send a complete request head; also how long an HTTP
    /// connection may sit idle before its first request or between requests.
    #[arg(
        long,
        env = "SWITCHBOARD_HEADER_READ_TIMEOUT",
        default_value_t = HttpLimits::DEFAULT_HEADER_READ_TIMEOUT.as_secs(),
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    header_read_timeout: u64,
    /// Seconds one plain HTTP request may take, reading its body included (WebSockets are
    /// not subject to it).
    #[arg(
        long,
        env = "SWITCHBOARD_REQUEST_TIMEOUT",
        default_value_t = HttpLimits::DEFAULT_REQUEST_TIMEOUT.as_secs(),
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    request_timeout: u64,
    /// Largest request head (request line and headers), in bytes.
    #[arg(long, env = "SWITCHBOARD_MAX_REQUEST_HEAD", default_value_t = HttpLimits::DEFAULT_MAX_REQUEST_HEAD)]
    max_request_head: usize,
    /// Most connections open at once, WebSockets included; 0 = unlimited [default: the
    /// open-files limit less 256]
    #[arg(long, env = "SWITCHBOARD_MAX_CONNECTIONS")]
    max_connections: Option<usize>,
    /// Most connections open at once from one client address (IPv6: one /64); 0 =
    /// unlimited. Behind a reverse proxy all clients share its address: raise it or use 0.
    #[arg(
        long,
        env = "SWITCHBOARD_MAX_CONNECTIONS_PER_ADDRESS",
        default_value_t = HttpLimits::DEFAULT_MAX_CONNECTIONS_PER_ADDRESS
    )]
    max_connections_per_address: usize,
    /// Bytes of messages queued per connection for its socket; a send to a full queue waits.
    #[arg(long, env = "SWITCHBOARD_SEND_QUEUE_SIZE", default_value_t = HubOptions::default().send_queue_size)]
    send_queue_size: usize,
    /// Seconds a send waits for room in a full queue before the recipient counts as not
    /// reading and is closed.
    #[arg(long, env = "SWITCHBOARD_SEND_TIMEOUT", default_value_t = HubOptions::default().send_timeout.as_secs_f64())]
    send_timeout: f64,
    /// Invocations per second one connection may make on average (faster ones are slowed
    /// down); 0 turns the limit off.
    #[arg(long, env = "SWITCHBOARD_MAX_INVOCATION_RATE", default_value_t = HubOptions::default().max_invocations_per_second)]
    max_invocation_rate: u32,
    /// Invocations one connection may make at once above its average rate.
    #[arg(long, env = "SWITCHBOARD_INVOCATION_BURST", default_value_t = HubOptions::default().invocation_burst)]
    invocation_burst: u32,
    /// Hub method calls of one connection that may run at the same time.
    #[arg(long, env = "SWITCHBOARD_MAX_PARALLEL_INVOCATIONS", default_value_t = HubOptions::default().max_parallel_invocations)]
    max_parallel_invocations: usize,
    /// Live connections one user may hold on this node (one per browser tab).
    #[arg(long, env = "SWITCHBOARD_MAX_CONNECTIONS_PER_USER", default_value_t = HubOptions::default().max_connections_per_user)]
    max_connections_per_user: usize,
    /// Negotiated connections that may wait for their WebSocket at once, in total.
    #[arg(long, env = "SWITCHBOARD_MAX_PENDING_NEGOTIATIONS", default_value_t = HubOptions::default().max_pending_negotiations)]
    max_pending_negotiations: usize,
    /// Negotiated connections of one user that may wait for their WebSocket at once.
    #[arg(long, env = "SWITCHBOARD_MAX_PENDING_NEGOTIATIONS_PER_USER", default_value_t = HubOptions::default().max_pending_negotiations_per_user)]
    max_pending_negotiations_per_user: usize,
    /// Seconds a negotiated connection waits for its WebSocket.
    #[arg(long, env = "SWITCHBOARD_NEGOTIATE_TIMEOUT", default_value_t = HubOptions::default().negotiate_ttl.as_secs())]
    negotiate_timeout: u64,
    /// Seconds every call to the connection store may take before it fails as a timeout.
    #[arg(long, env = "SWITCHBOARD_STORE_TIMEOUT", default_value_t = HubOptions::default().store_timeout.as_secs_f64())]
    store_timeout: f64,
}

/// A positive, finite number of seconds from the command line.
fn seconds(value: f64, flag: &str) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(value)
        .ok()
        .filter(|d| !d.is_zero())
        .with_context(|| format!("{flag} must be a positive number of seconds, not {value}"))
}

#[allow(
    clippy::print_stdout,
    reason = "the capabilities command prints its table"
)]
fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Capabilities => {
            print!("{}", Capabilities::markdown_table(&stores::compiled()));
            Ok(())
        }
        Command::Users(args) => runtime()?.block_on(cli_operators::users(
            args.store.store,
            args.store.settings()?,
            args.json,
        )),
        Command::Connections(args) => runtime()?.block_on(cli_operators::connections(
            args.store.store,
            args.store.settings()?,
            &args.user,
            args.json,
        )),
        Command::Serve(args) => {
            let node = switchboard::service::fresh_node_id(&args.node_id).context(
                "invalid --node-id prefix (use at most 55 characters from A-Z a-z 0-9 - . _ ~)",
            )?;
            let filter = EnvFilter::try_from_env("SWITCHBOARD_LOG")
                .unwrap_or_else(|_| EnvFilter::new("info"));
            logs::init(args.log_format, &node, filter).context("setting up logging")?;
            runtime()?.block_on(serve(*args, node))
        }
    }
}

/// `switchboard users` and `switchboard connections <user>`.
#[allow(
    clippy::print_stdout,
    reason = "the operator commands print their answers"
)]
mod cli_operators {
    use anyhow::Context as _;
    use switchboard::operators;
    use switchboard::stores::{self, StoreKind, StoreSettings};

    pub(super) async fn users(
        kind: StoreKind,
        settings: StoreSettings,
        json: bool,
    ) -> anyhow::Result<()> {
        let store = stores::open(kind, &settings).await?;
        let users = operators::list_users(store.as_ref())
            .await
            .context("listing the connected users")?;
        if json {
            println!("{}", operators::users_json(&users));
        } else {
            print!("{}", operators::users_table(&users));
        }
        Ok(())
    }

    pub(super) async fn connections(
        kind: StoreKind,
        settings: StoreSettings,
        user: &str,
        json: bool,
    ) -> anyhow::Result<()> {
        let store = stores::open(kind, &settings).await?;
        let records = operators::user_connections(store.as_ref(), user)
            .await
            .with_context(|| format!("listing the connections of {user:?}"))?;
        if json {
            println!("{}", operators::connections_json(&records));
        } else {
            print!("{}", operators::connections_table(&records));
        }
        Ok(())
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")
}

fn authenticator(args: &ServeArgs) -> anyhow::Result<Authenticator> {
    let secret = match (&args.jwt_secret, args.dev) {
        (Some(secret), _) => secret.clone().into_bytes(),
        (None, true) => {
            let mut secret = vec![0u8; 32];
            rand::RngExt::fill(&mut rand::rng(), &mut secret[..]);
            secret
        }
        (None, false) => bail!(
            "no --jwt-secret (or SWITCHBOARD_JWT_SECRET) is set: refusing to start without \
             authentication. Pass --dev for a development server with anonymous sign-in."
        ),
    };
    let mut config = JwtConfig::new(secret)
        .context("--jwt-secret must be at least 32 bytes long")?
        .with_user_claim(args.user_claim.clone());
    if let Some(issuer) = &args.jwt_issuer {
        config = config.with_issuer(issuer.clone());
    }
    if let Some(audience) = &args.jwt_audience {
        config = config.with_audience(audience.clone());
    }
    Ok(Authenticator::new(config))
}

async fn serve(args: ServeArgs, node: NodeId) -> anyhow::Result<()> {
    let auth = authenticator(&args)?;
    if args.dev {
        let banner = "DEVELOPMENT MODE: anyone can sign in as any user through POST /auth/dev-token. \
                      Never expose this server.";
        eprintln!(
            "\n!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!"
        );
        eprintln!("!!! {banner}");
        eprintln!(
            "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n"
        );
        tracing::warn!("{banner}");
    }
    let store = stores::open(args.store.store, &args.store.settings()?).await?;
    if args.backplane != BackplaneKind::None && !store.capabilities().spans_nodes() {
        bail!(
            "--store {} keeps each server's connections to itself: with --backplane {}, other \
             servers' users would never be found. Use a store that spans servers ({}), or no \
             backplane.",
            args.store.store,
            args.backplane,
            stores::spanning_strategies()
        );
    }
    let options = HubOptions::default()
        .with_max_record_size(args.max_message_size)
        .with_keep_alive_interval(Duration::from_secs(args.keep_alive))
        .with_client_timeout(Duration::from_secs(args.client_timeout))
        .with_handshake_timeout(Duration::from_secs(args.handshake_timeout))
        .with_send_queue_size(args.send_queue_size)
        .with_send_timeout(seconds(args.send_timeout, "--send-timeout")?)
        .with_invocation_rate(args.max_invocation_rate, args.invocation_burst)
        .with_max_parallel_invocations(args.max_parallel_invocations)
        .with_max_connections_per_user(args.max_connections_per_user)
        .with_max_pending_negotiations(args.max_pending_negotiations)
        .with_max_pending_negotiations_per_user(args.max_pending_negotiations_per_user)
        .with_negotiate_ttl(Duration::from_secs(args.negotiate_timeout.max(1)))
        .with_store_timeout(seconds(args.store_timeout, "--store-timeout")?)
        .with_lease(Duration::from_secs(args.node_lease))
        .with_max_pending_removals(args.max_pending_removals);
    let mut builder = HubService::builder(chat::hub(), store, auth.clone())
        .node(node.clone())
        .options(options);
    let settings = BackplaneSettings {
        redis_url: args.redis_url.clone(),
        postgres_url: args.store.database_url.clone(),
        prefix: args.backplane_prefix.clone(),
        max_payload: args.backplane_max_payload,
        buffer_messages: args.backplane_buffer_messages,
        buffer_bytes: args.backplane_buffer_bytes,
        buffer_age: seconds(args.backplane_buffer_age, "--backplane-buffer-age")?,
        presence_ttl: Duration::from_secs(args.node_lease),
    };
    if let Some(backplane) = stores::open_backplane(args.backplane, &settings).await? {
        builder = builder.backplane(backplane);
    }
    let hub = builder.build();
    hub.start().await.context("starting the hub")?;
    let router = app::router(
        &hub,
        &auth,
        &AppOptions {
            dev_tokens: args.dev,
            vendor_dir: Some(args.vendor_dir.clone()),
            admin: Some(if args.dev {
                AdminAccess::open(auth.clone())
            } else {
                AdminAccess::new(auth.clone(), args.admin_claim.clone())
            }),
        },
    );
    let limits = http_limits(&args);
    let listener = listen(args.listen).with_context(|| format!("listening on {}", args.listen))?;
    let address = listener.local_addr().context("reading the bound address")?;
    tracing::info!(
        store = %args.store.store,
        backplane = %args.backplane,
        node = %node,
        "Switchboard listening on http://{address} (chat hub at {})",
        chat::PATH
    );
    app::serve_with_limits(listener, router, vec![hub], limits, shutdown_signal())
        .await
        .context("serving")?;
    tracing::info!("stopped");
    Ok(())
}

/// The HTTP limits of `args`, after raising the open-files limit (which the default
/// connection cap follows) as far as the hard limit allows.
fn http_limits(args: &ServeArgs) -> HttpLimits {
    match http::raise_open_files_limit() {
        Ok(open_files) => tracing::debug!(open_files, "open-files limit"),
        Err(e) => tracing::warn!(error = %e, "could not raise the open-files limit"),
    }
    let mut limits = HttpLimits::default()
        .with_header_read_timeout(Duration::from_secs(args.header_read_timeout))
        .with_request_timeout(Duration::from_secs(args.request_timeout))
        .with_max_request_head(args.max_request_head)
        .with_max_connections_per_address(args.max_connections_per_address);
    if let Some(max) = args.max_connections {
        limits = limits.with_max_connections(max);
    }
    let cap = |n: usize| {
        if n == 0 {
            "unlimited".to_owned()
        } else {
            n.to_string()
        }
    };
    tracing::info!(
        max_connections = %cap(limits.max_connections),
        max_connections_per_address = %cap(limits.max_connections_per_address),
        header_read_timeout_s = args.header_read_timeout,
        request_timeout_s = args.request_timeout,
        "connection limits"
    );
    limits
}

/// Binds with a deep accept queue: bursts of thousands of connects (a deploy, a reconnect
/// storm) must not overflow the kernel's default of 128 and wait a SYN retransmit.
fn listen(address: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if address.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(address)?;
    socket.listen(4096)
}

async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
}
