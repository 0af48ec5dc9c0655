//! # switchboard-sql
//!
//! [`SqlStore`]: the user → connections mapping in SQL tables, after the classic "permanent,
//! external storage" strategy, on **PostgreSQL** (many nodes) or **SQLite** (one machine).
//! The URL picks the database: `postgres://…` or `sqlite://path.db` (created if missing) or
//! `sqlite::memory:` (tests).
//!
//! | | PostgreSQL | SQLite |
//! |---|---|---|
//! | more than one server | yes | processes on one machine sharing the file |
//! | look up a user's connections | yes | yes |
//! | list connected users | yes, indexed pages | yes, indexed pages |
//! | survives restarts | yes | yes (a file; not `sqlite::memory:`) |
//! | orphaned records | node leases on the database's clock + sweep | same |
//!
//! ## Schema
//!
//! Three tables, created by embedded migrations (`migrations/postgres`, `migrations/sqlite`)
//! when a store opens:
//!
//! * `connections`: one row per **live** connection (connection id, user, node, user agent,
//!   connection time, last seen), indexed by user (the delivery lookup) and by node (sweeps).
//! * `users`: one row per user with at least one recorded connection, with its connection
//!   count. Triggers on `connections` keep it exact in the same transaction as every insert
//!   and delete, so listing users walks the `users` primary key
//!   (`WHERE user_id > $after ORDER BY user_id LIMIT n`), page by page.
//! * `nodes`: one lease per node, its expiry on the **database's** clock (PostgreSQL
//!   `clock_timestamp()`, SQLite `unixepoch('subsec')`), so the nodes' clocks never need to
//!   agree.
//!
//! **Rows are deleted on disconnect.** The classic article keeps a `Connected` flag and sets it
//! to false; those rows pile up forever, and rows of a crashed server stay "connected" for
//! good. Here the tables hold live connections only, so they never grow without bound, and the
//! connections of a crashed node disappear from lookups as soon as its lease expires and from
//! the tables at the next [`sweep`](ConnectionStore::sweep).
//!
//! ## Concurrency
//!
//! **Writes are group-committed.** `add` and `remove` go through one writer task per store
//! (started on first use), fed by a bounded queue: each caller queues its operation with a
//! reply channel and waits; the writer takes whatever is queued (at most 256 operations) and
//! runs it as **one transaction**, then answers each caller with its own result (`Conflict`
//! for an add whose id is recorded, `NotFound` for the removal of an unknown id). Operations
//! of a batch run in arrival order, so an add and a removal of the same id in one batch end
//! removed. A lone operation runs as a single autocommit statement, as without batching.
//!
//! The batch is cut, in arrival order, into runs of operations on distinct connection ids
//! (which commute); each run is one statement for its adds and one for its removals:
//!
//! * SQLite: a multi-row `INSERT … VALUES … ON CONFLICT DO NOTHING RETURNING` and a
//!   `DELETE … WHERE (connection_id, user_id) IN (VALUES …) RETURNING`, in one transaction
//!   on the writer connection.
//! * PostgreSQL: `INSERT … SELECT FROM unnest(…) ON CONFLICT DO NOTHING RETURNING` and
//!   `DELETE … USING unnest(…) RETURNING`, with arrays as parameters, in one transaction.
//!
//! The ids each statement returns say which adds inserted and which removals deleted. The
//! per-row triggers keep `users` exact as for single statements.
//!
//! If the database cannot be reached, every operation of the batch fails with the same
//! [`StoreError::Unavailable`]. If a statement fails otherwise (a deadlock with another node's
//! batch on the `users` rows, a constraint), the transaction is rolled back and the batch's
//! operations are run again one by one, each in its own statement, each getting its own
//! answer. Callers never wait on a writer that is gone: if the writer task stopped, they get
//! [`StoreError::Unavailable`]. A caller that gives up (drops its future) leaves its operation
//! to be skipped if it has not started, or to complete with its answer discarded (as a
//! single statement would). The writer runs on the runtime of the store's first write; if
//! that runtime shuts down, writes fail with [`StoreError::Unavailable`].
//!
//! The cost: a store's adds and removals run one batch at a time, on one connection; a write
//! that arrives while a batch is in flight waits for it, then goes in the next batch. Under
//! concurrency that is much faster than one statement (and one commit) per write; a lone
//! write costs what it did.
//! `reconnect`, `heartbeat`, `sweep` and `release` do not go through the writer.
//!
//! Every other operation is a single statement (PostgreSQL: in autocommit, so one round trip),
//! except sweep and release, which are one transaction each. The `users` triggers use
//! `INSERT … ON CONFLICT DO UPDATE` and row locks,
//! which keeps the connection count exact under PostgreSQL's READ COMMITTED when the same user
//! connects and disconnects from many nodes at once: an add that meets a user row being
//! deleted waits for it and inserts a new one. SQLite has one writer at a time: the store
//! sends all its writes through one connection (no lock fights inside a process) and reads
//! through a small pool (WAL lets them run beside the writer).
//!
//! Opening is race-free: on PostgreSQL the schema is created and migrated under an advisory
//! lock, so nodes starting together do not trip over each other.
//!
//! ## Durability
//!
//! PostgreSQL sessions run with `synchronous_commit = off` unless
//! [`SqlConfig::with_synchronous_commit`] says otherwise: a commit does not wait for its WAL
//! flush, so a database crash can lose the last few hundred milliseconds of presence changes.
//! That is acceptable for presence: the lease sweep removes connections of nodes that died, and
//! clients that reconnect are recorded again. SQLite runs in WAL mode with
//! `synchronous = NORMAL` (durable across process crashes; a power loss can lose the last
//! transactions).
//!
//! ## Errors
//!
//! A database that cannot be reached fails fast: a connection is awaited at most
//! [`SqlConfig::DEFAULT_ACQUIRE_TIMEOUT`] (configurable), and the failure is transient
//! ([`StoreError::Unavailable`]). The pool reconnects by itself when the database is back.
//! Serialization failures, deadlocks, server shutdowns and SQLite `BUSY`/`LOCKED` are
//! transient too; constraint violations and everything else are permanent.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::str::FromStr as _;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{Executor as _, Row as _};
use switchboard_core::record::from_millis_since_epoch;
use switchboard_core::{
    Capabilities, ConnectionId, ConnectionRecord, ConnectionStore, Counts, Lease, NodeId,
    OrphanCleanup, PageRequest, Removal, Speed, StoreError, UserId, UserListing, UserPage,
};
use tokio::sync::{mpsc, oneshot};

static PG_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("migrations/postgres");
static SQLITE_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("migrations/sqlite");

/// The strategy name, as given to `--store`.
const STRATEGY: &str = "sql";

/// Which database a [`SqlStore`] talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dialect {
    /// SQLite: a file on this machine (or an in-memory database).
    Sqlite,
    /// PostgreSQL, shared by every node.
    Postgres,
}

/// How to open a [`SqlStore`].
#[derive(Clone)]
pub struct SqlConfig {
    url: String,
    schema: String,
    pool_size: Option<u32>,
    acquire_timeout: Duration,
    synchronous_commit: bool,
}

impl fmt::Debug for SqlConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqlConfig")
            .field("url", &redact(&self.url))
            .field("schema", &self.schema)
            .field("pool_size", &self.pool_size)
            .field("acquire_timeout", &self.acquire_timeout)
            .field("synchronous_commit", &self.synchronous_commit)
            .finish()
    }
}

impl SqlConfig {
    /// Connections in a PostgreSQL pool unless [`with_pool_size`](Self::with_pool_size) says
    /// otherwise.
    pub const DEFAULT_POOL_SIZE: u32 = 16;
    /// SQLite readers unless [`with_pool_size`](Self::with_pool_size) says otherwise (writes
    /// always go through one connection).
    pub const DEFAULT_SQLITE_READERS: u32 = 4;
    /// How long an operation waits for a pooled connection before failing transiently.
    pub const DEFAULT_ACQUIRE_TIMEOUT: Duration = Duration::from_secs(2);

    /// A configuration for the database at `url`: `postgres://user:password@host/db`,
    /// `sqlite://path.db` or `sqlite::memory:`.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            schema: "public".to_owned(),
            pool_size: None,
            acquire_timeout: Self::DEFAULT_ACQUIRE_TIMEOUT,
            synchronous_commit: false,
        }
    }

    /// PostgreSQL only: the tables live in this schema, created if missing (default
    /// `public`). Lowercase ASCII letters, digits and `_`, starting with a letter or `_`, at
    /// most 63 bytes.
    #[must_use]
    pub fn with_schema(mut self, schema: impl Into<String>) -> Self {
        self.schema = schema.into();
        self
    }

    /// The most connections of the pool (PostgreSQL, default
    /// [`DEFAULT_POOL_SIZE`](Self::DEFAULT_POOL_SIZE)) or of the SQLite readers (default
    /// [`DEFAULT_SQLITE_READERS`](Self::DEFAULT_SQLITE_READERS)). At least 1.
    #[must_use]
    pub fn with_pool_size(mut self, max: u32) -> Self {
        self.pool_size = Some(max.max(1));
        self
    }

    /// How long an operation waits for a connection (default
    /// [`DEFAULT_ACQUIRE_TIMEOUT`](Self::DEFAULT_ACQUIRE_TIMEOUT)); a database that went away
    /// makes operations fail after about this long.
    #[must_use]
    pub fn with_acquire_timeout(mut self, d: Duration) -> Self {
        self.acquire_timeout = d;
        self
    }

    /// PostgreSQL only: whether commits wait for their WAL flush (default `false`; see the
    /// [crate docs](crate#durability)).
    #[must_use]
    pub fn with_synchronous_commit(mut self, on: bool) -> Self {
        self.synchronous_commit = on;
        self
    }

    fn dialect(&self) -> Result<Dialect, SqlError> {
        let url = self.url.trim();
        if url.starts_with("sqlite:") {
            Ok(Dialect::Sqlite)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(Dialect::Postgres)
        } else {
            Err(SqlError::InvalidUrl(
                "the URL must start with `postgres://`, `postgresql://` or `sqlite:`".to_owned(),
            ))
        }
    }
}

/// Everything that can go wrong opening a [`SqlStore`]. Messages never contain the URL's
/// password.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SqlError {
    /// The URL is not a PostgreSQL or SQLite URL, or does not parse.
    #[error("invalid database URL: {0}")]
    InvalidUrl(String),
    /// The PostgreSQL schema name is not a plain lowercase identifier.
    #[error(
        "invalid schema name {0:?}: use 1 to 63 lowercase ASCII letters, digits and `_`, \
         starting with a letter or `_`"
    )]
    InvalidSchema(String),
    /// The database could not be reached or refused the connection.
    #[error("cannot connect to the database at {url}: {source}")]
    Connect {
        /// The URL without its password.
        url: String,
        /// The driver's error.
        #[source]
        source: sqlx::Error,
    },
    /// Creating the schema or running the migrations failed.
    #[error("cannot migrate the database schema: {0}")]
    Migrate(#[source] sqlx::migrate::MigrateError),
    /// Preparing the schema failed.
    #[error("cannot prepare the database schema: {0}")]
    Schema(#[source] sqlx::Error),
}

/// The URL with any password replaced by `***`.
fn redact(url: &str) -> Cow<'_, str> {
    let Some((scheme, rest)) = url.split_once("://") else {
        return Cow::Borrowed(url);
    };
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    let Some((userinfo, host)) = authority.rsplit_once('@') else {
        return Cow::Borrowed(url);
    };
    let user = userinfo.split_once(':').map_or(userinfo, |(user, _)| user);
    let masked = if userinfo.contains(':') {
        format!("{user}:***")
    } else {
        user.to_owned()
    };
    Cow::Owned(format!(
        "{scheme}://{masked}@{host}{}",
        &rest[authority_end..]
    ))
}

fn valid_schema(schema: &str) -> bool {
    let mut chars = schema.chars();
    schema.len() <= 63
        && chars
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

/// The SQL connection store on PostgreSQL or SQLite. See the [crate docs](crate).
///
/// Cloning is cheap: clones share the pools.
#[derive(Clone)]
pub struct SqlStore {
    inner: Arc<Inner>,
    writer: Arc<Writer>,
}

enum Inner {
    Sqlite {
        /// Readers (WAL lets them run beside the writer).
        read: SqlitePool,
        /// One connection: every write of this process, in turn.
        write: SqlitePool,
        /// Whether the database is a file (records survive the process).
        file: bool,
    },
    Postgres {
        pool: PgPool,
        schema: String,
    },
}

impl fmt::Debug for SqlStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &*self.inner {
            Inner::Sqlite { read, file, .. } => f
                .debug_struct("SqlStore")
                .field("dialect", &Dialect::Sqlite)
                .field("file", file)
                .field("readers", &read.options().get_max_connections())
                .finish(),
            Inner::Postgres { pool, schema } => f
                .debug_struct("SqlStore")
                .field("dialect", &Dialect::Postgres)
                .field("schema", schema)
                .field("pool_size", &pool.options().get_max_connections())
                .finish(),
        }
    }
}

impl SqlStore {
    /// The capabilities of a store on a database that outlives the process: PostgreSQL, or
    /// a SQLite file (shared by the processes of one machine). A `sqlite::memory:` store
    /// shares nothing and survives nothing; its [`capabilities`](ConnectionStore::capabilities)
    /// say so.
    pub const CAPABILITIES: Capabilities = Capabilities {
        strategy: STRATEGY,
        shared_across_nodes: true,
        spans_nodes_with_backplane: false,
        lookup: true,
        list_users: UserListing::Indexed,
        survives_restart: true,
        // Operations wait: for a network round trip (PostgreSQL), for file I/O on a worker
        // thread (SQLite). Both fail transiently, in bounded time, when the database cannot
        // be reached.
        speed: Speed::Network,
        orphan_cleanup: OrphanCleanup::LeaseSweep,
        leases: true,
    };

    /// Connects, creates the schema if missing and runs the migrations.
    ///
    /// # Errors
    ///
    /// [`SqlError`] when the URL or schema name is invalid, the database cannot be reached,
    /// or the migrations fail.
    pub async fn open(config: SqlConfig) -> Result<SqlStore, SqlError> {
        let store = Self::build(&config)?;
        match &*store.inner {
            Inner::Sqlite { write, .. } => {
                // Connect eagerly, so an unusable path fails here.
                let mut conn = write.acquire().await.map_err(|source| SqlError::Connect {
                    url: redact(&config.url).into_owned(),
                    source,
                })?;
                migrate_sqlite(&mut conn).await.map_err(SqlError::Migrate)?;
            }
            Inner::Postgres { pool, schema } => {
                let mut conn = pool.acquire().await.map_err(|source| SqlError::Connect {
                    url: redact(&config.url).into_owned(),
                    source,
                })?;
                // One opener at a time per schema: `CREATE SCHEMA IF NOT EXISTS` is not
                // race-free on its own. The migrator takes its own lock as well.
                let key = format!("switchboard-sql:{schema}");
                sqlx::query("SELECT pg_advisory_lock(hashtext($1))")
                    .bind(&key)
                    .execute(&mut *conn)
                    .await
                    .map_err(SqlError::Schema)?;
                let migrated = async {
                    conn.execute(format!("CREATE SCHEMA IF NOT EXISTS \"{schema}\"").as_str())
                        .await
                        .map_err(SqlError::Schema)?;
                    migrate_pg(&mut conn).await.map_err(SqlError::Migrate)
                }
                .await;
                let unlocked = sqlx::query("SELECT pg_advisory_unlock(hashtext($1))")
                    .bind(&key)
                    .execute(&mut *conn)
                    .await;
                migrated?;
                if let Err(e) = unlocked {
                    // Closing the session releases the lock anyway.
                    tracing::warn!(error = %e, "cannot release the migration lock; closing the session");
                    let _ = conn.detach();
                }
            }
        }
        tracing::debug!(store = ?store, "SQL connection store opened");
        Ok(store)
    }

    /// A store that connects on first use and runs no migrations: for tests of databases
    /// that cannot be reached.
    ///
    /// # Errors
    ///
    /// [`SqlError::InvalidUrl`] or [`SqlError::InvalidSchema`].
    #[cfg(feature = "testing")]
    pub fn open_lazy(config: SqlConfig) -> Result<SqlStore, SqlError> {
        Self::build(&config)
    }

    fn build(config: &SqlConfig) -> Result<SqlStore, SqlError> {
        let invalid = |e: sqlx::Error| {
            // sqlx's parse errors do not repeat the URL.
            SqlError::InvalidUrl(e.to_string())
        };
        let inner = match config.dialect()? {
            Dialect::Sqlite => {
                let url = config.url.trim();
                let memory = url.contains(":memory:") || url.contains("mode=memory");
                let mut options = SqliteConnectOptions::from_str(url)
                    .map_err(invalid)?
                    .create_if_missing(true)
                    .busy_timeout(Duration::from_secs(5))
                    .foreign_keys(false);
                if !memory {
                    options = options
                        .journal_mode(SqliteJournalMode::Wal)
                        .synchronous(SqliteSynchronous::Normal);
                }
                // No ping before each use: the database is a local file, and a ping is a
                // round trip through the worker thread that costs as much as the operation.
                let writer = SqlitePoolOptions::new()
                    .max_connections(1)
                    .test_before_acquire(false)
                    .acquire_timeout(config.acquire_timeout);
                if memory {
                    // Each connection to `:memory:` is its own database: one connection,
                    // kept forever, serves reads and writes.
                    let writer = writer
                        .min_connections(1)
                        .idle_timeout(None)
                        .max_lifetime(None);
                    let pool = writer.connect_lazy_with(options);
                    Inner::Sqlite {
                        read: pool.clone(),
                        write: pool,
                        file: false,
                    }
                } else {
                    let readers = SqlitePoolOptions::new()
                        .max_connections(
                            config
                                .pool_size
                                .unwrap_or(SqlConfig::DEFAULT_SQLITE_READERS),
                        )
                        .test_before_acquire(false)
                        .acquire_timeout(config.acquire_timeout);
                    Inner::Sqlite {
                        read: readers.connect_lazy_with(options.clone()),
                        write: writer.connect_lazy_with(options),
                        file: true,
                    }
                }
            }
            Dialect::Postgres => {
                if !valid_schema(&config.schema) {
                    return Err(SqlError::InvalidSchema(config.schema.clone()));
                }
                let commit = if config.synchronous_commit {
                    "on"
                } else {
                    "off"
                };
                let options = PgConnectOptions::from_str(config.url.trim())
                    .map_err(invalid)?
                    .application_name("switchboard")
                    .options([
                        ("search_path", config.schema.as_str()),
                        ("synchronous_commit", commit),
                    ]);
                // No ping before each use (it would double every operation's round trips):
                // a connection that broke (the server restarted) fails its next statement with
                // an I/O error, which is transient, and the pool drops it and opens a new one.
                let pool = PgPoolOptions::new()
                    .max_connections(config.pool_size.unwrap_or(SqlConfig::DEFAULT_POOL_SIZE))
                    .min_connections(0)
                    .test_before_acquire(false)
                    .acquire_timeout(config.acquire_timeout)
                    .connect_lazy_with(options);
                Inner::Postgres {
                    pool,
                    schema: config.schema.clone(),
                }
            }
        };
        let db = match &inner {
            Inner::Sqlite { write, .. } => Db::Sqlite(write.clone()),
            Inner::Postgres { pool, .. } => Db::Postgres(pool.clone()),
        };
        Ok(SqlStore {
            inner: Arc::new(inner),
            writer: Arc::new(Writer {
                db,
                queue: OnceLock::new(),
            }),
        })
    }

    /// Which database this store talks to.
    pub fn dialect(&self) -> Dialect {
        match &*self.inner {
            Inner::Sqlite { .. } => Dialect::Sqlite,
            Inner::Postgres { .. } => Dialect::Postgres,
        }
    }

    /// Closes the pools, waiting for connections in use to come back. Operations after this
    /// fail with [`StoreError::Unavailable`].
    pub async fn close(&self) {
        match &*self.inner {
            Inner::Sqlite { read, write, .. } => {
                read.close().await;
                write.close().await;
            }
            Inner::Postgres { pool, .. } => pool.close().await,
        }
    }
}

type Migration<'a> = std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<(), sqlx::migrate::MigrateError>> + Send + 'a>,
>;

/// Runs the SQLite migrations on `conn` (boxed, so the future is `Send` for every lifetime).
fn migrate_sqlite(conn: &mut sqlx::SqliteConnection) -> Migration<'_> {
    Box::pin(SQLITE_MIGRATIONS.run_direct(conn))
}

/// Runs the PostgreSQL migrations on `conn` (boxed, so the future is `Send` for every
/// lifetime).
fn migrate_pg(conn: &mut sqlx::PgConnection) -> Migration<'_> {
    Box::pin(PG_MIGRATIONS.run_direct(conn))
}

/// Maps a driver error to a [`StoreError`], transient when retrying later can help.
fn store_error(dialect: Dialect, e: sqlx::Error) -> StoreError {
    let unavailable = |message: &str, e: sqlx::Error| StoreError::Unavailable {
        message: message.to_owned(),
        source: Some(Box::new(e)),
    };
    match e {
        sqlx::Error::PoolTimedOut => {
            unavailable("no database connection became available in time", e)
        }
        sqlx::Error::PoolClosed => unavailable("the store was closed", e),
        sqlx::Error::Io(_) => unavailable("cannot talk to the database", e),
        sqlx::Error::Tls(_) => unavailable("TLS to the database failed", e),
        sqlx::Error::WorkerCrashed => unavailable("the database worker stopped", e),
        sqlx::Error::Database(ref db) => {
            let code = db.code().map(Cow::into_owned).unwrap_or_default();
            let transient = match dialect {
                // 40001 serialization failure, 40P01 deadlock, class 08 connection exception,
                // 53 insufficient resources, 57P01-57P03 shutdown / cannot connect now.
                Dialect::Postgres => {
                    code == "40001"
                        || code == "40P01"
                        || code.starts_with("08")
                        || code.starts_with("53")
                        || matches!(code.as_str(), "57P01" | "57P02" | "57P03")
                }
                // BUSY 5, LOCKED 6, IOERR 10, FULL 13, CANTOPEN 14 (primary codes).
                Dialect::Sqlite => code
                    .parse::<i32>()
                    .is_ok_and(|c| matches!(c & 0xff, 5 | 6 | 10 | 13 | 14)),
            };
            let message = format!("database error {code}: {}", db.message());
            if dialect == Dialect::Sqlite && code.parse::<i32>().is_ok_and(|c| c & 0xff == 14) {
                return StoreError::Unavailable {
                    message,
                    source: Some(Box::new(e)),
                };
            }
            StoreError::Backend {
                message,
                transient,
                source: Some(Box::new(e)),
            }
        }
        other => StoreError::Backend {
            message: other.to_string(),
            transient: false,
            source: Some(Box::new(other)),
        },
    }
}

fn corrupt(what: &str, e: impl fmt::Display) -> StoreError {
    StoreError::Corrupt(format!("{what}: {e}"))
}

/// Seconds of a lease, capped at [`Lease::MAX_TTL`].
fn ttl_secs(ttl: Duration) -> f64 {
    ttl.min(Lease::MAX_TTL).as_secs_f64()
}

fn lease_found(previous_existed: bool, previous_live: bool) -> Lease {
    match (previous_existed, previous_live) {
        (false, _) => Lease::Taken,
        (true, true) => Lease::Renewed,
        (true, false) => Lease::Lapsed,
    }
}

/// Builds a record from the columns both dialects return.
fn to_record(
    user: &UserId,
    id: &str,
    node: &str,
    user_agent: Option<&str>,
    connected_at: i64,
) -> Result<ConnectionRecord, StoreError> {
    let id = ConnectionId::new(id).map_err(|e| corrupt("connection id", e))?;
    let node = NodeId::new(node).map_err(|e| corrupt("node id", e))?;
    let record = ConnectionRecord::new(
        id,
        user.clone(),
        node,
        from_millis_since_epoch(connected_at),
    );
    Ok(match user_agent {
        Some(agent) => record.with_user_agent(agent),
        None => record,
    })
}

fn page_of(rows: Vec<String>, limit: usize) -> Result<UserPage, StoreError> {
    let more = rows.len() > limit;
    let users = rows
        .into_iter()
        .take(limit)
        .map(|u| UserId::new(&u).map_err(|e| corrupt("user id", e)))
        .collect::<Result<Vec<_>, _>>()?;
    let next = if more { users.last().cloned() } else { None };
    Ok(UserPage { users, next })
}

fn to_count(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

mod sql {
    //! The statements, per dialect. Only bound parameters reach them.

    /// Which bounds a page of users has, each a parameter bound in this order: the cursor
    /// (`> after`), the prefix (`>= prefix`) and the end of the prefix's range (`< upper`).
    #[derive(Debug, Clone, Copy)]
    pub struct Bounds {
        pub after: bool,
        pub from: bool,
        pub below: bool,
    }

    /// The page-of-users statement with `bounds`, numbering parameters `{mark}1..`; the
    /// limit is the last parameter.
    fn users(bounds: Bounds, live_user: &str, mark: char) -> String {
        let mut conditions = Vec::new();
        let mut n = 0;
        let mut param = || {
            n += 1;
            format!("{mark}{n}")
        };
        if bounds.after {
            conditions.push(format!("u.user_id > {}", param()));
        }
        if bounds.from {
            conditions.push(format!("u.user_id >= {}", param()));
        }
        if bounds.below {
            conditions.push(format!("u.user_id < {}", param()));
        }
        conditions.push(live_user.to_owned());
        let limit = param();
        format!(
            "SELECT u.user_id FROM users u WHERE {} ORDER BY u.user_id LIMIT {limit}",
            conditions.join(" AND ")
        )
    }

    pub mod pg {
        pub const ADD: &str = "INSERT INTO connections (connection_id, user_id, node_id, user_agent, connected_at) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (connection_id) DO NOTHING";
        pub const REMOVE: &str =
            "DELETE FROM connections WHERE connection_id = $1 AND user_id = $2";
        pub const ADD_MANY: &str = "INSERT INTO connections (connection_id, user_id, node_id, user_agent, connected_at) \
             SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::int8[]) \
             ON CONFLICT (connection_id) DO NOTHING RETURNING connection_id";
        pub const REMOVE_MANY: &str = "DELETE FROM connections c \
             USING unnest($1::text[], $2::text[]) AS r (connection_id, user_id) \
             WHERE c.connection_id = r.connection_id AND c.user_id = r.user_id \
             RETURNING c.connection_id";
        pub const RECONNECT: &str = "INSERT INTO connections (connection_id, user_id, node_id, user_agent, connected_at) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (connection_id) DO UPDATE SET \
             node_id = EXCLUDED.node_id, user_agent = EXCLUDED.user_agent, \
             connected_at = EXCLUDED.connected_at, last_seen = now() \
             WHERE connections.user_id = EXCLUDED.user_id";
        pub const CONNECTIONS: &str = "SELECT c.connection_id, c.node_id, c.user_agent, c.connected_at \
             FROM connections c LEFT JOIN nodes n ON n.node_id = c.node_id \
             WHERE c.user_id = $1 AND (n.expires_at IS NULL OR n.expires_at > clock_timestamp())";
        const LIVE_USER: &str = "EXISTS (SELECT 1 FROM connections c LEFT JOIN nodes n ON n.node_id = c.node_id \
             WHERE c.user_id = u.user_id AND (n.expires_at IS NULL OR n.expires_at > clock_timestamp()))";
        pub fn users(bounds: super::Bounds) -> String {
            super::users(bounds, LIVE_USER, '$')
        }
        pub const COUNTS: &str = "SELECT count(*), count(DISTINCT c.user_id) \
             FROM connections c LEFT JOIN nodes n ON n.node_id = c.node_id \
             WHERE n.expires_at IS NULL OR n.expires_at > clock_timestamp()";
        pub const COUNTS_BY_NODE: &str = "SELECT c.node_id, count(*) \
             FROM connections c LEFT JOIN nodes n ON n.node_id = c.node_id \
             WHERE n.expires_at IS NULL OR n.expires_at > clock_timestamp() GROUP BY c.node_id";
        pub const HEARTBEAT: &str = "INSERT INTO nodes (node_id, expires_at, previous_expires_at) \
             VALUES ($1, clock_timestamp() + make_interval(secs => $2), NULL) \
             ON CONFLICT (node_id) DO UPDATE SET \
             previous_expires_at = nodes.expires_at, expires_at = EXCLUDED.expires_at \
             RETURNING previous_expires_at IS NOT NULL, \
             coalesce(previous_expires_at > clock_timestamp(), false)";
        pub const EXPIRE_NODES: &str = "DELETE FROM nodes WHERE expires_at <= clock_timestamp()";
        pub const SWEEP: &str = "DELETE FROM connections c \
             WHERE NOT EXISTS (SELECT 1 FROM nodes n WHERE n.node_id = c.node_id)";
        pub const RELEASE_NODE: &str = "DELETE FROM nodes WHERE node_id = $1";
        pub const RELEASE: &str = "DELETE FROM connections WHERE node_id = $1";
    }

    pub mod sqlite {
        pub const ADD: &str = "INSERT INTO connections (connection_id, user_id, node_id, user_agent, connected_at) \
             VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT (connection_id) DO NOTHING";
        pub const REMOVE: &str =
            "DELETE FROM connections WHERE connection_id = ?1 AND user_id = ?2";
        /// Adds `n` rows; answers the ids inserted.
        pub fn add_many(n: usize) -> String {
            let mut s = String::from(
                "INSERT INTO connections (connection_id, user_id, node_id, user_agent, connected_at) VALUES ",
            );
            for i in 0..n {
                s.push_str(if i == 0 {
                    "(?,?,?,?,?)"
                } else {
                    ",(?,?,?,?,?)"
                });
            }
            s.push_str(" ON CONFLICT (connection_id) DO NOTHING RETURNING connection_id");
            s
        }
        /// Removes `n` (connection id, user) pairs; answers the ids deleted.
        pub fn remove_many(n: usize) -> String {
            let mut s =
                String::from("DELETE FROM connections WHERE (connection_id, user_id) IN (VALUES ");
            for i in 0..n {
                s.push_str(if i == 0 { "(?,?)" } else { ",(?,?)" });
            }
            s.push_str(") RETURNING connection_id");
            s
        }
        pub const RECONNECT: &str = "INSERT INTO connections (connection_id, user_id, node_id, user_agent, connected_at) \
             VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT (connection_id) DO UPDATE SET \
             node_id = excluded.node_id, user_agent = excluded.user_agent, \
             connected_at = excluded.connected_at, last_seen = unixepoch('subsec') \
             WHERE connections.user_id = excluded.user_id";
        pub const CONNECTIONS: &str = "SELECT c.connection_id, c.node_id, c.user_agent, c.connected_at \
             FROM connections c LEFT JOIN nodes n ON n.node_id = c.node_id \
             WHERE c.user_id = ?1 AND (n.expires_at IS NULL OR n.expires_at > unixepoch('subsec'))";
        const LIVE_USER: &str = "EXISTS (SELECT 1 FROM connections c LEFT JOIN nodes n ON n.node_id = c.node_id \
             WHERE c.user_id = u.user_id AND (n.expires_at IS NULL OR n.expires_at > unixepoch('subsec')))";
        pub fn users(bounds: super::Bounds) -> String {
            super::users(bounds, LIVE_USER, '$')
        }
        pub const COUNTS: &str = "SELECT count(*), count(DISTINCT c.user_id) \
             FROM connections c LEFT JOIN nodes n ON n.node_id = c.node_id \
             WHERE n.expires_at IS NULL OR n.expires_at > unixepoch('subsec')";
        pub const COUNTS_BY_NODE: &str = "SELECT c.node_id, count(*) \
             FROM connections c LEFT JOIN nodes n ON n.node_id = c.node_id \
             WHERE n.expires_at IS NULL OR n.expires_at > unixepoch('subsec') GROUP BY c.node_id";
        pub const HEARTBEAT: &str = "INSERT INTO nodes (node_id, expires_at, previous_expires_at) \
             VALUES (?1, unixepoch('subsec') + ?2, NULL) \
             ON CONFLICT (node_id) DO UPDATE SET \
             previous_expires_at = nodes.expires_at, expires_at = excluded.expires_at \
             RETURNING previous_expires_at IS NOT NULL, \
             coalesce(previous_expires_at > unixepoch('subsec'), 0)";
        pub const EXPIRE_NODES: &str = "DELETE FROM nodes WHERE expires_at <= unixepoch('subsec')";
        pub const SWEEP: &str = "DELETE FROM connections \
             WHERE NOT EXISTS (SELECT 1 FROM nodes n WHERE n.node_id = connections.node_id)";
        pub const RELEASE_NODE: &str = "DELETE FROM nodes WHERE node_id = ?1";
        pub const RELEASE: &str = "DELETE FROM connections WHERE node_id = ?1";
    }
}

/// Runs one statement binding a record's five columns, on either dialect; answers the rows it
/// changed.
macro_rules! write_record {
    ($db:expr, $stmt:ident, $record:expr) => {{
        let r = $record;
        let agent = r.user_agent();
        match $db {
            Db::Sqlite(pool) => sqlx::query(sql::sqlite::$stmt)
                .bind(r.id().as_str())
                .bind(r.user().as_str())
                .bind(r.node().as_str())
                .bind(agent)
                .bind(r.connected_at_millis())
                .execute(pool)
                .await
                .map(|done| done.rows_affected())
                .map_err(|e| store_error(Dialect::Sqlite, e)),
            Db::Postgres(pool) => sqlx::query(sql::pg::$stmt)
                .bind(r.id().as_str())
                .bind(r.user().as_str())
                .bind(r.node().as_str())
                .bind(agent)
                .bind(r.connected_at_millis())
                .execute(pool)
                .await
                .map(|done| done.rows_affected())
                .map_err(|e| store_error(Dialect::Postgres, e)),
        }
    }};
}

/// The most operations one batch (one transaction) carries.
const MAX_BATCH: usize = 256;
/// Operations waiting for the writer before callers wait to enqueue.
const QUEUE: usize = 4096;

/// Where the writer runs its batches.
#[derive(Clone)]
enum Db {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

/// One queued write and where its answer goes.
enum Op {
    Add(ConnectionRecord, oneshot::Sender<Result<(), StoreError>>),
    Remove(
        UserId,
        ConnectionId,
        oneshot::Sender<Result<Removal, StoreError>>,
    ),
}

impl Op {
    fn id(&self) -> &ConnectionId {
        match self {
            Op::Add(record, _) => record.id(),
            Op::Remove(_, id, _) => id,
        }
    }

    /// Whether the caller gave up (its future was dropped).
    fn abandoned(&self) -> bool {
        match self {
            Op::Add(_, reply) => reply.is_closed(),
            Op::Remove(_, _, reply) => reply.is_closed(),
        }
    }

    /// Answers with the outcome: `changed` is whether the row was inserted (add) or deleted
    /// (remove). A caller that gave up is not an error.
    fn answer(self, changed: bool) {
        match self {
            Op::Add(record, reply) => {
                let result = if changed {
                    Ok(())
                } else {
                    Err(StoreError::Conflict {
                        user: record.user().clone(),
                        id: record.id().clone(),
                    })
                };
                let _ = reply.send(result);
            }
            Op::Remove(_, _, reply) => {
                let _ = reply.send(Ok(if changed {
                    Removal::Removed
                } else {
                    Removal::NotFound
                }));
            }
        }
    }

    fn fail(self, e: StoreError) {
        match self {
            Op::Add(_, reply) => {
                let _ = reply.send(Err(e));
            }
            Op::Remove(_, _, reply) => {
                let _ = reply.send(Err(e));
            }
        }
    }
}

/// The store's group-commit writer: `add` and `remove` queue here, and one task runs what is
/// queued as one transaction. Started on first use (on the caller's runtime); it stops when
/// the last clone of the store is dropped.
struct Writer {
    db: Db,
    queue: OnceLock<mpsc::Sender<Op>>,
}

fn writer_gone() -> StoreError {
    StoreError::Unavailable {
        message: "the store's writer stopped".to_owned(),
        source: None,
    }
}

impl Writer {
    async fn submit<T>(
        &self,
        op: impl FnOnce(oneshot::Sender<Result<T, StoreError>>) -> Op,
    ) -> Result<T, StoreError> {
        let queue = self.queue.get_or_init(|| {
            let (tx, rx) = mpsc::channel(QUEUE);
            tokio::spawn(write_loop(self.db.clone(), rx));
            tx
        });
        let (reply, answer) = oneshot::channel();
        if queue.send(op(reply)).await.is_err() {
            return Err(writer_gone());
        }
        answer.await.unwrap_or_else(|_| Err(writer_gone()))
    }
}

async fn write_loop(db: Db, mut rx: mpsc::Receiver<Op>) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
        let ops: Vec<Op> = batch.drain(..).filter(|op| !op.abandoned()).collect();
        run_batch(&db, ops).await;
    }
}

/// How a batch failed.
enum BatchError {
    /// The database cannot be reached: every operation of the batch gets this error.
    Unavailable(StoreError),
    /// A statement failed (a deadlock with another node, a constraint): the transaction was
    /// rolled back and the operations are run one by one, each getting its own answer.
    OneByOne,
}

fn batch_error(dialect: Dialect, e: sqlx::Error) -> BatchError {
    match store_error(dialect, e) {
        e @ StoreError::Unavailable { .. } => BatchError::Unavailable(e),
        _ => BatchError::OneByOne,
    }
}

async fn run_batch(db: &Db, ops: Vec<Op>) {
    if ops.len() <= 1 {
        for op in ops {
            run_one(db, op).await;
        }
        return;
    }
    let outcome = match db {
        Db::Sqlite(pool) => sqlite_batch(pool, &ops).await,
        Db::Postgres(pool) => pg_batch(pool, &ops).await,
    };
    match outcome {
        Ok(changed) => {
            for (op, changed) in ops.into_iter().zip(changed) {
                op.answer(changed);
            }
        }
        Err(BatchError::Unavailable(e)) => {
            let (message, source) = match e {
                StoreError::Unavailable { message, source } => (message, source),
                other => (other.to_string(), None),
            };
            let mut source = source;
            for op in ops {
                op.fail(StoreError::Unavailable {
                    message: message.clone(),
                    source: source.take(),
                });
            }
        }
        Err(BatchError::OneByOne) => {
            for op in ops {
                run_one(db, op).await;
            }
        }
    }
}

/// One operation in its own statement (autocommit), as without batching.
async fn run_one(db: &Db, op: Op) {
    if op.abandoned() {
        return;
    }
    let changed = match (db, &op) {
        (_, Op::Add(r, _)) => write_record!(db, ADD, r),
        (Db::Sqlite(pool), Op::Remove(user, id, _)) => sqlx::query(sql::sqlite::REMOVE)
            .bind(id.as_str())
            .bind(user.as_str())
            .execute(pool)
            .await
            .map(|done| done.rows_affected())
            .map_err(|e| store_error(Dialect::Sqlite, e)),
        (Db::Postgres(pool), Op::Remove(user, id, _)) => sqlx::query(sql::pg::REMOVE)
            .bind(id.as_str())
            .bind(user.as_str())
            .execute(pool)
            .await
            .map(|done| done.rows_affected())
            .map_err(|e| store_error(Dialect::Postgres, e)),
    };
    match changed {
        Ok(rows) => op.answer(rows > 0),
        Err(e) => op.fail(e),
    }
}

/// The batch cut, in arrival order, into runs of operations on distinct connection ids:
/// inside a run the operations commute, so its adds and its removals can each be one
/// statement.
fn runs(ops: &[Op]) -> Vec<std::ops::Range<usize>> {
    let mut runs = Vec::new();
    let mut start = 0;
    while start < ops.len() {
        let mut ids: HashSet<&str> = HashSet::new();
        let mut end = start;
        while end < ops.len() && ids.insert(ops[end].id().as_str()) {
            end += 1;
        }
        runs.push(start..end);
        start = end;
    }
    runs
}

/// SQLite: each run of the batch is one multi-row `INSERT … ON CONFLICT DO NOTHING RETURNING`
/// for its adds and one `DELETE … WHERE (id, user) IN (VALUES …) RETURNING` for its removals,
/// all in one transaction on the writer connection.
async fn sqlite_batch(pool: &SqlitePool, ops: &[Op]) -> Result<Vec<bool>, BatchError> {
    let d = Dialect::Sqlite;
    let mut tx = pool.begin().await.map_err(|e| batch_error(d, e))?;
    let mut changed = vec![false; ops.len()];
    for run in runs(ops) {
        let adds: Vec<(usize, &ConnectionRecord)> = run
            .clone()
            .filter_map(|i| match &ops[i] {
                Op::Add(r, _) => Some((i, r)),
                Op::Remove(..) => None,
            })
            .collect();
        if !adds.is_empty() {
            let statement = sql::sqlite::add_many(adds.len());
            let mut query = sqlx::query_scalar::<_, String>(&statement);
            for (_, r) in &adds {
                query = query
                    .bind(r.id().as_str())
                    .bind(r.user().as_str())
                    .bind(r.node().as_str())
                    .bind(r.user_agent())
                    .bind(r.connected_at_millis());
            }
            let inserted = query
                .fetch_all(&mut *tx)
                .await
                .map_err(|e| batch_error(d, e))?;
            let inserted: HashSet<&str> = inserted.iter().map(String::as_str).collect();
            for (i, r) in &adds {
                changed[*i] = inserted.contains(r.id().as_str());
            }
        }
        let removes: Vec<(usize, &UserId, &ConnectionId)> = run
            .filter_map(|i| match &ops[i] {
                Op::Remove(user, id, _) => Some((i, user, id)),
                Op::Add(..) => None,
            })
            .collect();
        if !removes.is_empty() {
            let statement = sql::sqlite::remove_many(removes.len());
            let mut query = sqlx::query_scalar::<_, String>(&statement);
            for (_, user, id) in &removes {
                query = query.bind(id.as_str()).bind(user.as_str());
            }
            let removed = query
                .fetch_all(&mut *tx)
                .await
                .map_err(|e| batch_error(d, e))?;
            let removed: HashSet<&str> = removed.iter().map(String::as_str).collect();
            for (i, _, id) in &removes {
                changed[*i] = removed.contains(id.as_str());
            }
        }
    }
    tx.commit().await.map_err(|e| batch_error(d, e))?;
    Ok(changed)
}

/// PostgreSQL: the batch is cut, in arrival order, into runs of operations on distinct
/// connection ids (operations on distinct ids commute); each run is one `INSERT … SELECT FROM
/// unnest(…)` for its adds and one `DELETE … USING unnest(…)` for its removals, all in one
/// transaction. The per-row triggers keep `users` exact as for single statements.
async fn pg_batch(pool: &PgPool, ops: &[Op]) -> Result<Vec<bool>, BatchError> {
    let d = Dialect::Postgres;
    let mut tx = pool.begin().await.map_err(|e| batch_error(d, e))?;
    let mut changed = vec![false; ops.len()];
    for run in runs(ops) {
        let adds: Vec<(usize, &ConnectionRecord)> = run
            .clone()
            .filter_map(|i| match &ops[i] {
                Op::Add(r, _) => Some((i, r)),
                Op::Remove(..) => None,
            })
            .collect();
        if !adds.is_empty() {
            let inserted: Vec<String> = sqlx::query_scalar(sql::pg::ADD_MANY)
                .bind(
                    adds.iter()
                        .map(|(_, r)| r.id().as_str())
                        .collect::<Vec<_>>(),
                )
                .bind(
                    adds.iter()
                        .map(|(_, r)| r.user().as_str())
                        .collect::<Vec<_>>(),
                )
                .bind(
                    adds.iter()
                        .map(|(_, r)| r.node().as_str())
                        .collect::<Vec<_>>(),
                )
                .bind(adds.iter().map(|(_, r)| r.user_agent()).collect::<Vec<_>>())
                .bind(
                    adds.iter()
                        .map(|(_, r)| r.connected_at_millis())
                        .collect::<Vec<_>>(),
                )
                .fetch_all(&mut *tx)
                .await
                .map_err(|e| batch_error(d, e))?;
            let inserted: HashSet<&str> = inserted.iter().map(String::as_str).collect();
            for (i, r) in &adds {
                changed[*i] = inserted.contains(r.id().as_str());
            }
        }

        let removes: Vec<(usize, &UserId, &ConnectionId)> = run
            .filter_map(|i| match &ops[i] {
                Op::Remove(user, id, _) => Some((i, user, id)),
                Op::Add(..) => None,
            })
            .collect();
        if !removes.is_empty() {
            let removed: Vec<String> = sqlx::query_scalar(sql::pg::REMOVE_MANY)
                .bind(
                    removes
                        .iter()
                        .map(|(_, _, id)| id.as_str())
                        .collect::<Vec<_>>(),
                )
                .bind(
                    removes
                        .iter()
                        .map(|(_, u, _)| u.as_str())
                        .collect::<Vec<_>>(),
                )
                .fetch_all(&mut *tx)
                .await
                .map_err(|e| batch_error(d, e))?;
            let removed: HashSet<&str> = removed.iter().map(String::as_str).collect();
            for (i, _, id) in &removes {
                changed[*i] = removed.contains(id.as_str());
            }
        }
    }
    tx.commit().await.map_err(|e| batch_error(d, e))?;
    Ok(changed)
}

#[async_trait]
impl ConnectionStore for SqlStore {
    fn capabilities(&self) -> Capabilities {
        let file = match &*self.inner {
            Inner::Sqlite { file, .. } => *file,
            Inner::Postgres { .. } => true,
        };
        // PostgreSQL: every node. SQLite: every process on this machine opening the same
        // file sees the same records (an in-memory database: this instance only).
        Capabilities {
            shared_across_nodes: file,
            survives_restart: file,
            ..Self::CAPABILITIES
        }
    }

    async fn add(&self, record: ConnectionRecord) -> Result<(), StoreError> {
        self.writer.submit(|reply| Op::Add(record, reply)).await
    }

    async fn remove(&self, user: &UserId, id: &ConnectionId) -> Result<Removal, StoreError> {
        self.writer
            .submit(|reply| Op::Remove(user.clone(), id.clone(), reply))
            .await
    }

    async fn reconnect(&self, record: ConnectionRecord) -> Result<(), StoreError> {
        let changed = write_record!(&self.writer.db, RECONNECT, &record)?;
        if changed == 0 {
            // The id is recorded for another user: ids belong to one user for life, so this
            // is a caller's bug; the other user's record stays.
            tracing::warn!(connection = %record.id(), user = %record.user(),
                "reconnect of a connection id recorded for another user ignored");
        }
        Ok(())
    }

    async fn connections(&self, user: &UserId) -> Result<Vec<ConnectionRecord>, StoreError> {
        let (rows, dialect) = match &*self.inner {
            Inner::Sqlite { read, .. } => (
                sqlx::query(sql::sqlite::CONNECTIONS)
                    .bind(user.as_str())
                    .fetch_all(read)
                    .await
                    .map_err(|e| store_error(Dialect::Sqlite, e))?
                    .into_iter()
                    .map(|row| {
                        Ok::<_, sqlx::Error>((
                            row.try_get::<String, _>(0)?,
                            row.try_get::<String, _>(1)?,
                            row.try_get::<Option<String>, _>(2)?,
                            row.try_get::<i64, _>(3)?,
                        ))
                    })
                    .collect::<Result<Vec<_>, _>>(),
                Dialect::Sqlite,
            ),
            Inner::Postgres { pool, .. } => (
                sqlx::query(sql::pg::CONNECTIONS)
                    .bind(user.as_str())
                    .fetch_all(pool)
                    .await
                    .map_err(|e| store_error(Dialect::Postgres, e))?
                    .into_iter()
                    .map(|row| {
                        Ok::<_, sqlx::Error>((
                            row.try_get::<String, _>(0)?,
                            row.try_get::<String, _>(1)?,
                            row.try_get::<Option<String>, _>(2)?,
                            row.try_get::<i64, _>(3)?,
                        ))
                    })
                    .collect::<Result<Vec<_>, _>>(),
                Dialect::Postgres,
            ),
        };
        let rows = rows.map_err(|e| store_error(dialect, e))?;
        rows.iter()
            .map(|(id, node, agent, at)| to_record(user, id, node, agent.as_deref(), *at))
            .collect()
    }

    async fn users(&self, page: PageRequest) -> Result<UserPage, StoreError> {
        let limit = page.effective_limit();
        let fetch = i64::try_from(limit)
            .unwrap_or(i64::MAX - 1)
            .saturating_add(1);
        // Users within a prefix are exactly those in [prefix, upper) in byte order, which
        // the primary key's index finds as a range.
        let upper = page.prefix_upper_bound();
        let bounds = sql::Bounds {
            after: page.after.is_some(),
            from: page.prefix().is_some(),
            below: upper.is_some(),
        };
        let binds = [
            page.after.as_ref().map(UserId::as_str),
            page.prefix(),
            upper.as_deref(),
        ];
        let rows: Vec<String> = match &*self.inner {
            Inner::Sqlite { read, .. } => {
                let statement = sql::sqlite::users(bounds);
                let mut query = sqlx::query_scalar::<_, String>(&statement);
                for bind in binds.into_iter().flatten() {
                    query = query.bind(bind);
                }
                query
                    .bind(fetch)
                    .fetch_all(read)
                    .await
                    .map_err(|e| store_error(Dialect::Sqlite, e))?
            }
            Inner::Postgres { pool, .. } => {
                let statement = sql::pg::users(bounds);
                let mut query = sqlx::query_scalar::<_, String>(&statement);
                for bind in binds.into_iter().flatten() {
                    query = query.bind(bind);
                }
                query
                    .bind(fetch)
                    .fetch_all(pool)
                    .await
                    .map_err(|e| store_error(Dialect::Postgres, e))?
            }
        };
        page_of(rows, limit)
    }

    async fn counts_by_node(&self) -> Result<BTreeMap<NodeId, u64>, StoreError> {
        let rows: Vec<(String, i64)> = match &*self.inner {
            Inner::Sqlite { read, .. } => sqlx::query_as(sql::sqlite::COUNTS_BY_NODE)
                .fetch_all(read)
                .await
                .map_err(|e| store_error(Dialect::Sqlite, e))?,
            Inner::Postgres { pool, .. } => sqlx::query_as(sql::pg::COUNTS_BY_NODE)
                .fetch_all(pool)
                .await
                .map_err(|e| store_error(Dialect::Postgres, e))?,
        };
        rows.into_iter()
            .map(|(node, count)| {
                let node = NodeId::new(&node).map_err(|e| corrupt("node id", e))?;
                Ok((node, to_count(count)))
            })
            .collect()
    }

    async fn counts(&self) -> Result<Counts, StoreError> {
        let (connections, users): (i64, i64) = match &*self.inner {
            Inner::Sqlite { read, .. } => sqlx::query_as(sql::sqlite::COUNTS)
                .fetch_one(read)
                .await
                .map_err(|e| store_error(Dialect::Sqlite, e))?,
            Inner::Postgres { pool, .. } => sqlx::query_as(sql::pg::COUNTS)
                .fetch_one(pool)
                .await
                .map_err(|e| store_error(Dialect::Postgres, e))?,
        };
        Ok(Counts {
            users: to_count(users),
            connections: to_count(connections),
        })
    }

    async fn heartbeat(&self, node: &NodeId, ttl: Duration) -> Result<Lease, StoreError> {
        let secs = ttl_secs(ttl);
        let (existed, live): (bool, bool) = match &*self.inner {
            Inner::Sqlite { write, .. } => sqlx::query_as(sql::sqlite::HEARTBEAT)
                .bind(node.as_str())
                .bind(secs)
                .fetch_one(write)
                .await
                .map_err(|e| store_error(Dialect::Sqlite, e))?,
            Inner::Postgres { pool, .. } => sqlx::query_as(sql::pg::HEARTBEAT)
                .bind(node.as_str())
                .bind(secs)
                .fetch_one(pool)
                .await
                .map_err(|e| store_error(Dialect::Postgres, e))?,
        };
        Ok(lease_found(existed, live))
    }

    async fn sweep(&self) -> Result<u64, StoreError> {
        let removed = match &*self.inner {
            Inner::Sqlite { write, .. } => {
                let d = Dialect::Sqlite;
                let mut tx = write.begin().await.map_err(|e| store_error(d, e))?;
                sqlx::query(sql::sqlite::EXPIRE_NODES)
                    .execute(&mut *tx)
                    .await
                    .map_err(|e| store_error(d, e))?;
                let removed = sqlx::query(sql::sqlite::SWEEP)
                    .execute(&mut *tx)
                    .await
                    .map_err(|e| store_error(d, e))?
                    .rows_affected();
                tx.commit().await.map_err(|e| store_error(d, e))?;
                removed
            }
            Inner::Postgres { pool, .. } => {
                let d = Dialect::Postgres;
                let mut tx = pool.begin().await.map_err(|e| store_error(d, e))?;
                sqlx::query(sql::pg::EXPIRE_NODES)
                    .execute(&mut *tx)
                    .await
                    .map_err(|e| store_error(d, e))?;
                let removed = sqlx::query(sql::pg::SWEEP)
                    .execute(&mut *tx)
                    .await
                    .map_err(|e| store_error(d, e))?
                    .rows_affected();
                tx.commit().await.map_err(|e| store_error(d, e))?;
                removed
            }
        };
        if removed > 0 {
            tracing::info!(removed, "swept connections of expired nodes");
        }
        Ok(removed)
    }

    async fn release(&self, node: &NodeId) -> Result<u64, StoreError> {
        let removed = match &*self.inner {
            Inner::Sqlite { write, .. } => {
                let d = Dialect::Sqlite;
                let mut tx = write.begin().await.map_err(|e| store_error(d, e))?;
                sqlx::query(sql::sqlite::RELEASE_NODE)
                    .bind(node.as_str())
                    .execute(&mut *tx)
                    .await
                    .map_err(|e| store_error(d, e))?;
                let removed = sqlx::query(sql::sqlite::RELEASE)
                    .bind(node.as_str())
                    .execute(&mut *tx)
                    .await
                    .map_err(|e| store_error(d, e))?
                    .rows_affected();
                tx.commit().await.map_err(|e| store_error(d, e))?;
                removed
            }
            Inner::Postgres { pool, .. } => {
                let d = Dialect::Postgres;
                let mut tx = pool.begin().await.map_err(|e| store_error(d, e))?;
                sqlx::query(sql::pg::RELEASE_NODE)
                    .bind(node.as_str())
                    .execute(&mut *tx)
                    .await
                    .map_err(|e| store_error(d, e))?;
                let removed = sqlx::query(sql::pg::RELEASE)
                    .bind(node.as_str())
                    .execute(&mut *tx)
                    .await
                    .map_err(|e| store_error(d, e))?
                    .rows_affected();
                tx.commit().await.map_err(|e| store_error(d, e))?;
                removed
            }
        };
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_show() {
        assert_eq!(
            redact("postgres://bob:s3cret@db.example:5432/app?sslmode=require"),
            "postgres://bob:***@db.example:5432/app?sslmode=require"
        );
        assert_eq!(redact("postgres://bob@db/app"), "postgres://bob@db/app");
        assert_eq!(redact("sqlite://x.db"), "sqlite://x.db");
        let config = SqlConfig::new("postgres://bob:s3cret@db/app");
        assert!(!format!("{config:?}").contains("s3cret"));
    }

    #[test]
    fn schema_names_are_plain_identifiers() {
        assert!(valid_schema("sb1x2"));
        assert!(valid_schema("_x"));
        assert!(!valid_schema("Public"));
        assert!(!valid_schema("a\"; DROP"));
        assert!(!valid_schema(""));
        assert!(!valid_schema(&"a".repeat(64)));
    }

    #[test]
    fn urls_pick_the_dialect() {
        assert_eq!(
            SqlConfig::new("sqlite::memory:").dialect().ok(),
            Some(Dialect::Sqlite)
        );
        assert_eq!(
            SqlConfig::new("postgresql://h/db").dialect().ok(),
            Some(Dialect::Postgres)
        );
        assert!(matches!(
            SqlConfig::new("mysql://h/db").dialect(),
            Err(SqlError::InvalidUrl(_))
        ));
    }
}
