//! # switchboard-azure
//!
//! The Azure Table Storage strategy of the classic comparison: one table (`connection`
//! unless [configured](AzureConfig::with_table)), **PartitionKey = the user, RowKey = the
//! connection id**, so that a user's connections are one partition and looking them up is one
//! partition query. Several server nodes share the table; records survive restarts of the
//! nodes and of the service.
//!
//! ## Entities
//!
//! | property | type | value |
//! |---|---|---|
//! | `PartitionKey` | key | the user, [encoded](#keys) |
//! | `RowKey` | key | the connection id, encoded |
//! | `User` | `Edm.String` | the user as given (the key may be a hash of it) |
//! | `UserAgent` | `Edm.String` | the client's user agent, when it sent one |
//! | `ConnectedAt` | `Edm.DateTime` | when the connection was established (ms precision) |
//! | `Node` | `Edm.String` | the node that holds the socket |
//!
//! Node leases live in the same table, in the partition `!leases` (no encoded key starts with
//! `!`): RowKey = the encoded node id, properties `Node` and `TtlMs` (`Edm.Int64`); the lease
//! runs until the entity's service-set `Timestamp` plus `TtlMs`. The row `!clock` of that
//! partition is written to read the service's clock.
//!
//! ## Keys
//!
//! User ids may hold any character but control characters (`a/b`, `o'brien`, `#`, `?`, `%`,
//! unicode, up to [`UserId::MAX_LEN`] bytes), while keys may not hold `/ \ # ?` or control
//! characters, and a single quote or `%` in a key breaks on the way through URLs and
//! filters (Azurite silently cuts a key at a quote). So keys hold only `A-Z a-z 0-9 - _ .`;
//! every other byte is written `~XX` (upper-case hex). An encoding longer than 400
//! characters becomes `~h` + the SHA-256 of the user in hex, and the user is read back from
//! the `User` property. Both forms are reversible and deterministic.
//!
//! ## The clock, and leases
//!
//! Leases are measured on the **service's** clock, so node clocks never need to agree. The
//! service stamps every write with its own time (the `Timestamp` property, also carried in
//! the write's ETag). A store instance learns the offset of its monotonic clock from the
//! service's by writing the `!clock` row, taking the middle of the round trip as the moment
//! of the stamp; every heartbeat refreshes it, and it is taken again after a minute. The
//! error is half a round trip.
//!
//! Lookups filter the records of expired nodes with a cached copy of the lease partition: a
//! lease the cache shows live is live (leases only grow until they are swept or released,
//! which removes their records first), and the cache is read again, at most every 100 ms,
//! whenever a record's node looks expired or unknown. So a lookup costs one partition query,
//! and a second request only while a dead node's records wait for the sweep.
//!
//! ## Costs
//!
//! | operation | requests |
//! |---|---|
//! | `add`, `remove`, `reconnect` | 1 |
//! | `connections(user)` | 1 partition query (plus the lease partition, see above) |
//! | `users`, `counts` | a scan of the whole table, page by page (1000 entities a page) |
//! | `heartbeat` | 2 (read the old lease, write the new one) |
//! | `sweep` | the lease partition twice, a scan filtered on the service's side to the records of nodes without a live lease, and the deletes, batched 100 per partition in entity-group transactions |
//! | `release` | a scan filtered on the node, and batched deletes |
//!
//! Listing users is [`UserListing::FullScan`]: the service has no secondary index, and a
//! users index would have to be kept right under concurrent connects and disconnects with
//! no transaction spanning partitions. It serves operators' pages, not hot paths.
//!
//! ## Failures
//!
//! A store sends at most [`DEFAULT_MAX_IN_FLIGHT`] requests at a time
//! ([`AzureConfig::with_max_in_flight`]); more wait for a turn, at most the request timeout.
//! A burst (a reconnect storm, a busy chat) then queues in the node instead of opening a
//! connection per request and piling up in a service that is already slow; without the
//! bound, Azurite answered a 10 000-connection storm with connect timeouts. Every request
//! has a timeout ([`DEFAULT_REQUEST_TIMEOUT`]). Transient failures — the
//! service unreachable, a timeout, 408, 429, 500, 502, 503, 504 — are retried with capped
//! exponential backoff and jitter for up to [`DEFAULT_RETRY_BUDGET`], then answered as a
//! transient [`StoreError`]. Permanent ones (403 for a wrong key, 400 for bad input) are
//! answered at once. A missing table (deleted, or an in-memory emulator that restarted) is
//! created again and the operation retried. An `add` retried after a lost answer finds its
//! own entity and succeeds rather than reporting a conflict; a `remove` retried after a lost
//! answer reports [`Removal::NotFound`].
//!
//! ## The client
//!
//! Requests go through the `azure_data_tables` SDK (0.21, without OpenSSL) behind a small
//! internal seam (`table.rs`) that holds every workaround it needs: its retry policy is off
//! (it retried Azurite's 500s for about a minute), it is given an HTTP client that keeps
//! connections alive (its own keeps none), transactions are checked operation by operation
//! (a failed one answers success), and keys are made safe before they reach it (it escapes
//! nothing). The SDK is the legacy line without a maintained successor; the seam is where a
//! client speaking the Table REST API directly (SharedKeyLite signing) would go.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use switchboard_core::record::{from_millis_since_epoch, millis_since_epoch};
use switchboard_core::{
    Capabilities, ConnectionId, ConnectionRecord, ConnectionStore, Counts, Lease, NodeId,
    OrphanCleanup, PageRequest, Removal, Speed, StoreError, UserId, UserListing, UserPage,
};

mod config;
mod keys;
mod table;

pub use config::{
    AzureConfig, ConfigError, DEFAULT_MAX_IN_FLIGHT, DEFAULT_REQUEST_TIMEOUT, DEFAULT_RETRY_BUDGET,
    DEFAULT_TABLE,
};

use table::{BatchOutcome, Deleted, Failure, Inserted, Read, Table};

const STRATEGY: &str = "azure";
/// The partition of the node leases. No encoded key starts with `!`.
const LEASES: &str = "!leases";
/// The row of [`LEASES`] written to read the service's clock.
const CLOCK_ROW: &str = "!clock";
/// Selects the connection partitions: every partition key after [`LEASES`].
const CONNECTIONS: &str = "PartitionKey gt '!leases'";
/// How old the cached lease partition may be when a lookup doubts a node.
const LEASE_VIEW_FRESH: Duration = Duration::from_millis(100);
/// The most live nodes a sweep names in its filter; with more, it scans every record.
const MAX_FILTERED_NODES: usize = 40;
/// How long a clock reading is trusted before it is taken again.
const CLOCK_FRESH: Duration = Duration::from_secs(60);
/// How often a failing service is logged.
const WARN_EVERY: Duration = Duration::from_secs(10);
/// The first backoff between retries, and the cap.
const BACKOFF: (Duration, Duration) = (Duration::from_millis(50), Duration::from_secs(1));

/// A point in time on the service's clock, in microseconds since the Unix epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct ServiceTime(i64);

impl ServiceTime {
    fn parse(text: &str) -> Option<Self> {
        let parsed =
            time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
                .ok()?;
        i64::try_from(parsed.unix_timestamp_nanos() / 1000)
            .ok()
            .map(Self)
    }

    fn plus(self, d: Duration) -> Self {
        Self(
            self.0
                .saturating_add(i64::try_from(d.as_micros()).unwrap_or(i64::MAX)),
        )
    }
}

/// The service time carried by a table ETag, `W/"datetime'2026-12-02T15%3A50%3A00.1234567Z'"`.
fn etag_time(etag: &str) -> Option<ServiceTime> {
    let start = etag.find("datetime'")? + "datetime'".len();
    let rest = &etag[start..];
    let stamp = &rest[..rest.find('\'')?];
    ServiceTime::parse(&stamp.replace("%3A", ":").replace("%3a", ":"))
}

/// The offset between this process's monotonic clock and the service's.
#[derive(Debug, Clone, Copy)]
struct Clock {
    at: Instant,
    service: ServiceTime,
}

impl Clock {
    fn now(&self) -> ServiceTime {
        self.service.plus(self.at.elapsed())
    }
}

/// A lease as the lease partition holds it.
#[derive(Debug, Clone, Copy)]
struct LeaseState {
    expires: ServiceTime,
}

/// The lease partition as last read.
#[derive(Debug, Clone)]
struct LeaseView {
    read_at: Option<Instant>,
    leases: Arc<HashMap<String, LeaseState>>,
}

/// What a lease view says about a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Judgement {
    Live,
    Expired,
    /// The node holds no lease: it never took one (its records count as live until a sweep).
    Unleased,
}

impl LeaseView {
    fn judge(&self, node: &str, now: ServiceTime) -> Judgement {
        match self.leases.get(node) {
            Some(lease) if lease.expires > now => Judgement::Live,
            Some(_) => Judgement::Expired,
            None => Judgement::Unleased,
        }
    }

    fn is_fresh(&self) -> bool {
        self.read_at
            .is_some_and(|at| at.elapsed() < LEASE_VIEW_FRESH)
    }
}

/// A connection entity as written.
#[derive(Serialize)]
struct ConnectionEntity<'a> {
    #[serde(rename = "PartitionKey")]
    partition: &'a str,
    #[serde(rename = "RowKey")]
    row: &'a str,
    #[serde(rename = "User")]
    user: &'a str,
    #[serde(rename = "UserAgent", skip_serializing_if = "Option::is_none")]
    user_agent: Option<&'a str>,
    #[serde(rename = "ConnectedAt")]
    connected_at: String,
    #[serde(rename = "ConnectedAt@odata.type")]
    connected_at_type: &'static str,
    #[serde(rename = "Node")]
    node: &'a str,
}

impl<'a> ConnectionEntity<'a> {
    /// The entity of `record`, under its encoded keys.
    fn of(record: &'a ConnectionRecord, partition: &'a str, row: &'a str) -> Self {
        Self {
            partition,
            row,
            user: record.user().as_str(),
            user_agent: record.user_agent(),
            connected_at: date_time(record.connected_at()),
            connected_at_type: "Edm.DateTime",
            node: record.node().as_str(),
        }
    }
}

/// A connection entity as read (any subset of its properties).
#[derive(Debug, Deserialize)]
struct StoredConnection {
    #[serde(rename = "PartitionKey")]
    partition: String,
    #[serde(rename = "RowKey", default)]
    row: String,
    #[serde(rename = "User", default)]
    user: Option<String>,
    #[serde(rename = "UserAgent", default)]
    user_agent: Option<String>,
    #[serde(rename = "ConnectedAt", default)]
    connected_at: Option<String>,
    #[serde(rename = "Node", default)]
    node: Option<String>,
}

/// A lease entity as written.
#[derive(Serialize)]
struct LeaseEntity<'a> {
    #[serde(rename = "Node")]
    node: &'a str,
    #[serde(rename = "TtlMs")]
    ttl_ms: String,
    #[serde(rename = "TtlMs@odata.type")]
    ttl_ms_type: &'static str,
}

/// A lease entity as read.
#[derive(Debug, Deserialize)]
struct StoredLease {
    #[serde(rename = "RowKey", default)]
    row: String,
    #[serde(rename = "Node", default)]
    node: Option<String>,
    #[serde(rename = "TtlMs", default)]
    ttl_ms: Option<serde_json::Value>,
}

impl StoredLease {
    fn ttl(&self) -> Duration {
        let ms = match &self.ttl_ms {
            Some(serde_json::Value::String(s)) => s.parse::<u64>().ok(),
            Some(serde_json::Value::Number(n)) => n.as_u64(),
            _ => None,
        };
        Duration::from_millis(ms.unwrap_or(0))
    }
}

/// The clock row's entity.
#[derive(Serialize)]
struct ClockEntity {
    #[serde(rename = "Purpose")]
    purpose: &'static str,
}

/// `ConnectedAt` as the service's `Edm.DateTime` text, to the millisecond.
fn date_time(at: SystemTime) -> String {
    let ms = millis_since_epoch(at);
    let time = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        time.year(),
        u8::from(time.month()),
        time.day(),
        time.hour(),
        time.minute(),
        time.second(),
        time.millisecond()
    )
}

/// The Table Storage connection store; see the [crate docs](crate).
pub struct AzureStore {
    table: Table,
    retry_budget: Duration,
    clock: Mutex<Option<Clock>>,
    clock_refresh: tokio::sync::Mutex<()>,
    leases: Mutex<LeaseView>,
    lease_refresh: tokio::sync::Mutex<()>,
    table_create: tokio::sync::Mutex<()>,
    /// Whether the last operation gave up on a transient failure.
    failing: AtomicBool,
    /// What was logged about failures.
    failure_log: Mutex<FailureLog>,
}

/// What [`AzureStore`] logged about transient failures.
#[derive(Debug, Default)]
struct FailureLog {
    /// When a failure was last logged.
    last: Option<Instant>,
    /// Failures since then that were not logged.
    suppressed: u64,
    /// A failure was logged and its recovery was not yet.
    announced: bool,
}

impl fmt::Debug for AzureStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AzureStore")
            .field("table", &self.table.name())
            .finish_non_exhaustive()
    }
}

impl AzureStore {
    /// What every Azure store can do.
    pub const CAPABILITIES: Capabilities = Capabilities {
        strategy: STRATEGY,
        shared_across_nodes: true,
        spans_nodes_with_backplane: false,
        lookup: true,
        list_users: UserListing::FullScan,
        survives_restart: true,
        speed: Speed::Network,
        orphan_cleanup: OrphanCleanup::LeaseSweep,
        leases: true,
    };

    /// Opens the store: creates the table if it is missing (an existing table is fine), and
    /// reads the service's clock.
    ///
    /// # Errors
    ///
    /// A transient [`StoreError`] when the service cannot be reached within the retry budget;
    /// a permanent one when it refuses (403: wrong key).
    pub async fn open(config: AzureConfig) -> Result<Self, StoreError> {
        let store = Self::open_lazy(config)?;
        store
            .retry("creating the table", |_| store.table.create())
            .await?;
        store.now().await?;
        Ok(store)
    }

    /// A store that does no I/O until its first operation (and creates the table when an
    /// operation finds it missing).
    ///
    /// # Errors
    ///
    /// When the HTTP client cannot be built.
    pub fn open_lazy(config: AzureConfig) -> Result<Self, StoreError> {
        let table = Table::new(&config).map_err(|f| StoreError::Backend {
            message: f.to_string(),
            transient: false,
            source: None,
        })?;
        Ok(Self {
            table,
            retry_budget: config.retry_budget,
            clock: Mutex::new(None),
            clock_refresh: tokio::sync::Mutex::new(()),
            leases: Mutex::new(LeaseView {
                read_at: None,
                leases: Arc::new(HashMap::new()),
            }),
            lease_refresh: tokio::sync::Mutex::new(()),
            table_create: tokio::sync::Mutex::new(()),
            failing: AtomicBool::new(false),
            failure_log: Mutex::new(FailureLog::default()),
        })
    }

    /// Deletes the table and everything in it (tests, and operators tearing a deployment
    /// down). A missing table is success.
    ///
    /// # Errors
    ///
    /// Store failures.
    pub async fn delete_table(&self) -> Result<(), StoreError> {
        self.retry("deleting the table", |_| self.table.delete_table())
            .await
    }

    /// The table's name.
    pub fn table(&self) -> &str {
        self.table.name()
    }

    /// Runs `attempt` until it succeeds, fails permanently, or the retry budget is spent.
    /// A missing table is created once, and the attempt repeated.
    async fn retry<T, F, Fut>(&self, what: &'static str, mut attempt: F) -> Result<T, StoreError>
    where
        F: FnMut(u32) -> Fut,
        Fut: Future<Output = Result<T, Failure>>,
    {
        let deadline = Instant::now() + self.retry_budget;
        let mut delay = BACKOFF.0;
        let mut created = false;
        let mut n = 0;
        loop {
            n += 1;
            let failure = match attempt(n).await {
                Ok(value) => {
                    if self.failing.load(Ordering::Relaxed) {
                        self.recovered();
                    }
                    return Ok(value);
                }
                Err(failure) => failure,
            };
            if failure.is_table_missing() && !created {
                created = true;
                self.create_table().await?;
                continue;
            }
            let jittered = delay.mul_f64(0.5 + rand::random::<f64>() * 0.5);
            if failure.is_transient() && Instant::now() + jittered < deadline {
                tracing::debug!(
                    table = self.table.name(),
                    attempt = n,
                    "{what}: {failure}; retrying"
                );
                tokio::time::sleep(jittered).await;
                delay = (delay * 2).min(BACKOFF.1);
                continue;
            }
            if failure.is_transient() {
                self.gave_up(what, &failure);
            }
            return Err(store_error(what, failure));
        }
    }

    /// Logs that an operation gave up on a transient failure: at most one line every
    /// [`WARN_EVERY`], with the count of failures not logged since the last one.
    fn gave_up(&self, what: &str, failure: &Failure) {
        self.failing.store(true, Ordering::Relaxed);
        let mut log = self
            .failure_log
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if log.last.is_none_or(|at| at.elapsed() >= WARN_EVERY) {
            tracing::warn!(
                table = self.table.name(),
                not_logged = log.suppressed,
                "{what}: {failure}"
            );
            *log = FailureLog {
                last: Some(Instant::now()),
                suppressed: 0,
                announced: true,
            };
        } else {
            log.suppressed += 1;
        }
    }

    /// Logs that the service answers again, once after a logged failure.
    fn recovered(&self) {
        if self.failing.swap(false, Ordering::Relaxed) {
            let mut log = self
                .failure_log
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if std::mem::take(&mut log.announced) {
                tracing::info!(
                    table = self.table.name(),
                    "the Azure table service answers again"
                );
            }
        }
    }

    /// Creates the table, once for concurrent callers.
    async fn create_table(&self) -> Result<(), StoreError> {
        let _one = self.table_create.lock().await;
        tracing::info!(
            table = self.table.name(),
            "the table is missing; creating it"
        );
        let mut delay = BACKOFF.0;
        let deadline = Instant::now() + self.retry_budget;
        loop {
            match self.table.create().await {
                Ok(()) => return Ok(()),
                // A table just deleted cannot be created again for a while.
                Err(f)
                    if (f.is_transient() || matches!(&f, Failure::Status { status: 409, .. }))
                        && Instant::now() + delay < deadline =>
                {
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(BACKOFF.1);
                }
                Err(f) => return Err(store_error("creating the table", f)),
            }
        }
    }

    /// The service's time now, reading its clock first when it was not read recently.
    async fn now(&self) -> Result<ServiceTime, StoreError> {
        if let Some(clock) = self.fresh_clock() {
            return Ok(clock.now());
        }
        let _one = self.clock_refresh.lock().await;
        if let Some(clock) = self.fresh_clock() {
            return Ok(clock.now());
        }
        let stamp = self
            .retry("reading the service's clock", |_| async {
                let sent = Instant::now();
                let etag = self
                    .table
                    .upsert(LEASES, CLOCK_ROW, &ClockEntity { purpose: "clock" })
                    .await?;
                Ok((sent, Instant::now(), etag))
            })
            .await?;
        let (sent, received, etag) = stamp;
        let at = self.stamp_time(LEASES, CLOCK_ROW, &etag).await?;
        Ok(self.set_clock(sent, received, at).now())
    }

    fn fresh_clock(&self) -> Option<Clock> {
        let clock = *self.clock.lock().unwrap_or_else(PoisonError::into_inner);
        clock.filter(|c| c.at.elapsed() < CLOCK_FRESH)
    }

    /// Records that the service stamped `at` during a request sent at `sent` and answered at
    /// `received`.
    fn set_clock(&self, sent: Instant, received: Instant, at: ServiceTime) -> Clock {
        let clock = Clock {
            at: sent + (received - sent) / 2,
            service: at,
        };
        *self.clock.lock().unwrap_or_else(PoisonError::into_inner) = Some(clock);
        clock
    }

    /// The service time of the write that answered `etag`: from the ETag, or failing that
    /// from the entity's `Timestamp`.
    async fn stamp_time(
        &self,
        partition: &str,
        row: &str,
        etag: &str,
    ) -> Result<ServiceTime, StoreError> {
        if let Some(at) = etag_time(etag) {
            return Ok(at);
        }
        let read = self
            .retry("reading a timestamp", |_| {
                self.table.get::<serde_json::Value>(partition, row)
            })
            .await?;
        read.and_then(|r| ServiceTime::parse(&r.timestamp))
            .ok_or_else(|| {
                StoreError::Corrupt(format!(
                    "the entity {partition}/{row} has no readable timestamp"
                ))
            })
    }

    /// Reads the lease partition.
    async fn read_leases(&self) -> Result<Vec<Read<StoredLease>>, StoreError> {
        let rows = self
            .retry("reading the node leases", |_| {
                self.table.query::<StoredLease>(
                    format!("PartitionKey eq {}", keys::literal(LEASES)),
                    "RowKey,Node,TtlMs,Timestamp",
                )
            })
            .await?;
        Ok(rows
            .into_iter()
            .filter(|r| r.entity.row != CLOCK_ROW)
            .collect())
    }

    /// Reads the lease partition into the cached view.
    async fn refresh_leases(&self) -> Result<LeaseView, StoreError> {
        let started = Instant::now();
        let _one = self.lease_refresh.lock().await;
        {
            let view = self.leases.lock().unwrap_or_else(PoisonError::into_inner);
            if view.read_at.is_some_and(|at| at >= started) {
                return Ok(view.clone());
            }
        }
        self.load_leases().await.map(|(view, _)| view)
    }

    /// Reads the lease partition into the cached view, and answers the rows too (with their
    /// ETags, for conditional deletes).
    async fn load_leases(&self) -> Result<(LeaseView, Vec<Read<StoredLease>>), StoreError> {
        let read_at = Instant::now();
        let rows = self.read_leases().await?;
        let leases = rows
            .iter()
            .filter_map(|row| {
                let node = row.entity.node.clone()?;
                let stamp = ServiceTime::parse(&row.timestamp)?;
                Some((
                    node,
                    LeaseState {
                        expires: stamp.plus(row.entity.ttl()),
                    },
                ))
            })
            .collect();
        let view = LeaseView {
            read_at: Some(read_at),
            leases: Arc::new(leases),
        };
        *self.leases.lock().unwrap_or_else(PoisonError::into_inner) = view.clone();
        Ok((view, rows))
    }

    /// A lease view fit to judge `nodes` now: the cached one when it shows them all live or
    /// is fresh, else a new reading.
    async fn judge<'a>(
        &self,
        nodes: impl Iterator<Item = &'a str>,
    ) -> Result<(LeaseView, ServiceTime), StoreError> {
        let now = self.now().await?;
        let view = self
            .leases
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let mut nodes = nodes;
        if view.is_fresh() || nodes.all(|n| view.judge(n, now) == Judgement::Live) {
            return Ok((view, now));
        }
        let view = self.refresh_leases().await?;
        Ok((view, self.now().await?))
    }

    /// Updates the cached lease of `node`.
    fn cache_lease(&self, node: &str, lease: Option<LeaseState>) {
        let mut view = self.leases.lock().unwrap_or_else(PoisonError::into_inner);
        let mut leases = (*view.leases).clone();
        match lease {
            Some(lease) => leases.insert(node.to_owned(), lease),
            None => leases.remove(node),
        };
        view.leases = Arc::new(leases);
    }

    /// Every connection entity, with the given properties.
    async fn scan(
        &self,
        filter: String,
        select: &'static str,
    ) -> Result<Vec<Read<StoredConnection>>, StoreError> {
        self.retry("scanning the table", |_| {
            self.table.query::<StoredConnection>(filter.clone(), select)
        })
        .await
    }

    /// The user behind a stored partition key.
    fn user_of(entity: &StoredConnection) -> Result<UserId, StoreError> {
        let text = match keys::decode(&entity.partition)
            .map_err(|e| StoreError::Corrupt(e.to_string()))?
        {
            keys::Decoded::Text(text) => text,
            keys::Decoded::Hashed => {
                let user = entity.user.clone().ok_or_else(|| {
                    StoreError::Corrupt("a hashed partition key without its User property".into())
                })?;
                if !keys::matches_hash(&entity.partition, &user) {
                    return Err(StoreError::Corrupt(
                        "a hashed partition key does not match its User property".into(),
                    ));
                }
                user
            }
        };
        UserId::new(&text).map_err(|e| StoreError::Corrupt(format!("stored user: {e}")))
    }

    fn record_of(entity: &StoredConnection) -> Result<ConnectionRecord, StoreError> {
        let user = Self::user_of(entity)?;
        let id = match keys::decode(&entity.row).map_err(|e| StoreError::Corrupt(e.to_string()))? {
            keys::Decoded::Text(text) => ConnectionId::new(&text)
                .map_err(|e| StoreError::Corrupt(format!("stored connection id: {e}")))?,
            keys::Decoded::Hashed => {
                return Err(StoreError::Corrupt("a hashed connection id".into()));
            }
        };
        let node = NodeId::new(entity.node.as_deref().unwrap_or_default())
            .map_err(|e| StoreError::Corrupt(format!("stored node id: {e}")))?;
        let connected_at = entity
            .connected_at
            .as_deref()
            .and_then(ServiceTime::parse)
            .map(|t| from_millis_since_epoch(t.0.div_euclid(1000)))
            .ok_or_else(|| {
                StoreError::Corrupt(format!("connection {id} has no readable ConnectedAt"))
            })?;
        let mut record = ConnectionRecord::new(id, user, node, connected_at);
        if let Some(agent) = entity.user_agent.as_deref() {
            record = record.with_user_agent(agent);
        }
        Ok(record)
    }

    /// The live connection entities of the whole table (users, counts).
    async fn live_entities(&self) -> Result<Vec<StoredConnection>, StoreError> {
        let rows = self
            .scan(CONNECTIONS.to_owned(), "PartitionKey,User,Node,Timestamp")
            .await?;
        let (view, now) = self
            .judge(
                rows.iter()
                    .map(|r| r.entity.node.as_deref().unwrap_or_default()),
            )
            .await?;
        Ok(rows
            .into_iter()
            .map(|r| r.entity)
            .filter(|e| {
                view.judge(e.node.as_deref().unwrap_or_default(), now) != Judgement::Expired
            })
            .collect())
    }

    /// Deletes the given entities of one partition, batched; answers how many were deleted.
    /// With `conditional`, an entity that changed since it was read stays.
    async fn delete_rows(
        &self,
        partition: &str,
        rows: Vec<(String, String)>,
        conditional: bool,
    ) -> Result<u64, StoreError> {
        let mut deleted = 0;
        for chunk in rows.chunks(table::MAX_BATCH) {
            let outcome = if chunk.len() == 1 {
                BatchOutcome::RolledBack
            } else {
                self.retry("deleting connections", |_| {
                    self.table.delete_batch(partition, chunk)
                })
                .await?
            };
            match outcome {
                BatchOutcome::AllDeleted => deleted += chunk.len() as u64,
                BatchOutcome::RolledBack => {
                    for (row, etag) in chunk {
                        let condition = conditional.then_some(etag.as_str());
                        let done = self
                            .retry("deleting a connection", |_| {
                                self.table.delete(partition, row, condition)
                            })
                            .await?;
                        if done == Deleted::Gone {
                            deleted += 1;
                        }
                    }
                }
            }
        }
        Ok(deleted)
    }

    /// Deletes entities grouped by partition; answers how many were deleted.
    async fn delete_grouped(
        &self,
        rows: Vec<Read<StoredConnection>>,
        conditional: bool,
    ) -> Result<u64, StoreError> {
        let mut by_partition: HashMap<String, Vec<(String, String)>> = HashMap::new();
        for row in rows {
            by_partition
                .entry(row.entity.partition)
                .or_default()
                .push((row.entity.row, row.etag));
        }
        let mut deleted = 0;
        for (partition, rows) in by_partition {
            deleted += self.delete_rows(&partition, rows, conditional).await?;
        }
        Ok(deleted)
    }
}

fn store_error(what: &'static str, failure: Failure) -> StoreError {
    match failure {
        Failure::Timeout(after) => StoreError::Timeout(after),
        Failure::Transport(_) => StoreError::Unavailable {
            message: format!("{what}: {failure}"),
            source: Some(Box::new(failure)),
        },
        Failure::Status { .. } | Failure::Decode(_) => StoreError::Backend {
            message: format!("{what}: {failure}"),
            transient: failure.is_transient(),
            source: Some(Box::new(failure)),
        },
    }
}

#[async_trait]
impl ConnectionStore for AzureStore {
    fn capabilities(&self) -> Capabilities {
        Self::CAPABILITIES
    }

    async fn add(&self, record: ConnectionRecord) -> Result<(), StoreError> {
        let partition = keys::encode(record.user().as_str());
        let row = keys::encode(record.id().as_str());
        let entity = ConnectionEntity::of(&record, &partition, &row);
        let mut retried = false;
        let inserted = self
            .retry("recording a connection", |n| {
                retried |= n > 1;
                self.table.insert(&entity)
            })
            .await?;
        if inserted == Inserted::Created {
            return Ok(());
        }
        if retried {
            // An earlier attempt may have written it before its answer was lost.
            let stored = self
                .retry("reading a connection", |_| {
                    self.table.get::<StoredConnection>(&partition, &row)
                })
                .await?;
            if let Some(stored) = stored
                && Self::record_of(&stored.entity).is_ok_and(|r| r == record)
            {
                return Ok(());
            }
        }
        Err(StoreError::Conflict {
            user: record.user().clone(),
            id: record.id().clone(),
        })
    }

    async fn remove(&self, user: &UserId, id: &ConnectionId) -> Result<Removal, StoreError> {
        let partition = keys::encode(user.as_str());
        let row = keys::encode(id.as_str());
        let deleted = self
            .retry("removing a connection", |_| {
                self.table.delete(&partition, &row, None)
            })
            .await?;
        Ok(match deleted {
            Deleted::Gone => Removal::Removed,
            Deleted::NotFound | Deleted::Changed => Removal::NotFound,
        })
    }

    async fn reconnect(&self, record: ConnectionRecord) -> Result<(), StoreError> {
        let partition = keys::encode(record.user().as_str());
        let row = keys::encode(record.id().as_str());
        let entity = ConnectionEntity::of(&record, &partition, &row);
        self.retry("recording a reconnection", |_| {
            self.table.upsert(&partition, &row, &entity)
        })
        .await
        .map(drop)
    }

    async fn connections(&self, user: &UserId) -> Result<Vec<ConnectionRecord>, StoreError> {
        let partition = keys::encode(user.as_str());
        let rows = self
            .scan(
                format!("PartitionKey eq {}", keys::literal(&partition)),
                "PartitionKey,RowKey,User,UserAgent,ConnectedAt,Node,Timestamp",
            )
            .await?;
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        let (view, now) = self
            .judge(
                rows.iter()
                    .map(|r| r.entity.node.as_deref().unwrap_or_default()),
            )
            .await?;
        let mut records = Vec::with_capacity(rows.len());
        for row in rows {
            if view.judge(row.entity.node.as_deref().unwrap_or_default(), now) == Judgement::Expired
            {
                continue;
            }
            let record = Self::record_of(&row.entity)?;
            // A hashed partition holds only this user, but check rather than trust.
            if record.user() == user {
                records.push(record);
            }
        }
        Ok(records)
    }

    async fn users(&self, page: PageRequest) -> Result<UserPage, StoreError> {
        let entities = self.live_entities().await?;
        let mut seen = HashSet::new();
        let mut users = Vec::new();
        for entity in &entities {
            if seen.insert(entity.partition.as_str()) {
                users.push(Self::user_of(entity)?);
            }
        }
        Ok(page.select(users))
    }

    async fn counts(&self) -> Result<Counts, StoreError> {
        let entities = self.live_entities().await?;
        let users: HashSet<&str> = entities.iter().map(|e| e.partition.as_str()).collect();
        Ok(Counts {
            users: users.len() as u64,
            connections: entities.len() as u64,
        })
    }

    async fn counts_by_node(&self) -> Result<BTreeMap<NodeId, u64>, StoreError> {
        let mut counts = BTreeMap::new();
        for entity in self.live_entities().await? {
            let node = entity.node.as_deref().unwrap_or_default();
            let node = NodeId::new(node).map_err(|e| {
                StoreError::Corrupt(format!("a connection names an invalid node: {e}"))
            })?;
            *counts.entry(node).or_insert(0) += 1;
        }
        Ok(counts)
    }

    async fn heartbeat(&self, node: &NodeId, ttl: Duration) -> Result<Lease, StoreError> {
        let ttl = ttl.min(Lease::MAX_TTL);
        let row = keys::encode(node.as_str());
        let old = self
            .retry("reading a node lease", |_| {
                self.table.get::<StoredLease>(LEASES, &row)
            })
            .await?;
        let entity = LeaseEntity {
            node: node.as_str(),
            ttl_ms: ttl.as_millis().to_string(),
            ttl_ms_type: "Edm.Int64",
        };
        let (sent, received, etag) = self
            .retry("renewing a node lease", |_| async {
                let sent = Instant::now();
                let etag = self.table.upsert(LEASES, &row, &entity).await?;
                Ok((sent, Instant::now(), etag))
            })
            .await?;
        let at = self.stamp_time(LEASES, &row, &etag).await?;
        self.set_clock(sent, received, at);
        self.cache_lease(
            node.as_str(),
            Some(LeaseState {
                expires: at.plus(ttl),
            }),
        );
        Ok(match old {
            None => Lease::Taken,
            Some(old) => match ServiceTime::parse(&old.timestamp) {
                Some(stamp) if stamp.plus(old.entity.ttl()) > at => Lease::Renewed,
                _ => Lease::Lapsed,
            },
        })
    }

    async fn sweep(&self) -> Result<u64, StoreError> {
        // The scan asks the service for the records of every node that holds no live lease
        // (filtered on the service's side, so only those cross the wire).
        let before = self.refresh_leases().await?;
        let now = self.now().await?;
        let mut live: Vec<&str> = before
            .leases
            .iter()
            .filter(|(_, lease)| lease.expires > now)
            .map(|(node, _)| node.as_str())
            .collect();
        live.sort_unstable();
        let filter = if live.len() <= MAX_FILTERED_NODES {
            live.iter().fold(CONNECTIONS.to_owned(), |filter, node| {
                format!("{filter} and Node ne {}", keys::literal(node))
            })
        } else {
            CONNECTIONS.to_owned()
        };
        let rows = self.scan(filter, "PartitionKey,RowKey,Node").await?;
        // Read the leases again after the scan: a node that renewed meanwhile (and may have
        // recorded its connections again before the scan read them) keeps its records.
        let (view, leases) = self.load_leases().await?;
        let now = self.now().await?;
        let doomed: Vec<_> = rows
            .into_iter()
            .filter(|r| {
                view.judge(r.entity.node.as_deref().unwrap_or_default(), now) != Judgement::Live
            })
            .collect();
        // Conditional deletes: a record written again since the scan (a reconnect) stays.
        let swept = if doomed.is_empty() {
            0
        } else {
            self.delete_grouped(doomed, true).await?
        };
        // Forget the leases that had expired, each only if it was not renewed since (its
        // ETag is unchanged).
        for lease in leases {
            let Some(node) = &lease.entity.node else {
                continue;
            };
            if view.judge(node, now) != Judgement::Expired {
                continue;
            }
            let gone = self
                .retry("forgetting an expired lease", |_| {
                    self.table
                        .delete(LEASES, &lease.entity.row, Some(&lease.etag))
                })
                .await?;
            if gone == Deleted::Gone {
                self.cache_lease(node, None);
            }
        }
        if swept > 0 {
            tracing::info!(
                table = self.table.name(),
                swept,
                "swept the connections of expired nodes"
            );
        }
        Ok(swept)
    }

    async fn release(&self, node: &NodeId) -> Result<u64, StoreError> {
        let rows = self
            .scan(
                format!("{CONNECTIONS} and Node eq {}", keys::literal(node.as_str())),
                "PartitionKey,RowKey,Node,Timestamp",
            )
            .await?;
        let released = if rows.is_empty() {
            0
        } else {
            self.delete_grouped(rows, false).await?
        };
        let row = keys::encode(node.as_str());
        self.retry("ending a node lease", |_| {
            self.table.delete(LEASES, &row, None)
        })
        .await?;
        self.cache_lease(node.as_str(), None);
        Ok(released)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etags_carry_the_service_time() {
        let at = etag_time("W/\"datetime'2026-12-02T15%3A50%3A00.1234567Z'\"").expect("parses");
        let expected = ServiceTime::parse("2026-12-02T15:50:00.123456Z").expect("parses");
        assert_eq!(at, expected);
        assert_eq!(etag_time("\"0x8D\""), None);
    }

    #[test]
    fn connected_at_is_written_to_the_millisecond() {
        let at = from_millis_since_epoch(1_764_690_600_123);
        let text = date_time(at);
        assert_eq!(text, "2025-12-02T15:50:00.123Z");
        let back = ServiceTime::parse(&text).expect("parses");
        assert_eq!(back.0, 1_764_690_600_123_000);
    }
}

#[cfg(test)]
mod azurite_tests;
