//! The backplane: an outbox writer task and an inbox reader task per node.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use sha2::{Digest, Sha256};
use sqlx::postgres::{PgConnectOptions, PgListener, PgPool, PgPoolOptions};
use switchboard_core::backplane::Ordering;
use switchboard_core::{
    Address, Backplane, BackplaneCapabilities, BackplaneError, DeliveryClass, Health, Inbox,
    Message, NodeId, Reach,
};
use tokio::sync::{Notify, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep, timeout};

use crate::config::PostgresConfig;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Most outbox entries written in one transaction.
const BATCH: usize = 256;
/// Most rows one drain takes per round.
const DRAIN: i64 = 512;
/// Most writers whose numbers a reader remembers.
const MAX_WRITERS_REMEMBERED: usize = 4096;
/// Longest pause between reconnect attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(1);

const NAME: &str = "postgres";

/// A [`Backplane`] over PostgreSQL tables, woken by LISTEN/NOTIFY; see the
/// [crate docs](crate) for the design.
///
/// One value per node; [`start`](Backplane::start) connects. Delivery is
/// [`DeliveryClass::Resumable`] within the retention, ordered per sender, with node and
/// channel addresses and an exact [`Reach`](switchboard_core::Reach).
pub struct PostgresBackplane {
    shared: Arc<Shared>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

struct Shared {
    config: PostgresConfig,
    options: PgConnectOptions,
    writer_token: String,
    phase: Mutex<Phase>,
    outbox: Mutex<Outbox>,
    work: Notify,
    stop: watch::Sender<bool>,
    writer_down: Mutex<Option<String>>,
    reader_down: Mutex<Option<String>>,
}

enum Phase {
    New,
    Running { node: NodeId, pool: PgPool },
    Stopped,
}

#[derive(Default)]
struct Outbox {
    queue: VecDeque<Entry>,
    messages: usize,
    bytes: usize,
    next_seq: u64,
}

struct Entry {
    op: Op,
    bytes: usize,
    seq: u64,
    deadline: Instant,
    answer: oneshot::Sender<Result<u64, BackplaneError>>,
}

enum Op {
    ToNode { node: String, row: Bytes },
    ToChannel { channel: String, row: Bytes },
    Subscribe(String),
    Unsubscribe(String),
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The NOTIFY channel of `node` in `schema`: 43 bytes, well under PostgreSQL's 63.
pub(crate) fn doorbell(schema: &str, node: &str) -> String {
    let digest = Sha256::digest(format!("{schema}\0{node}").as_bytes());
    let mut out = String::with_capacity(43);
    out.push_str("sb_");
    for b in digest.iter().take(20) {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

fn valid_schema(schema: &str) -> bool {
    let mut bytes = schema.bytes();
    matches!(bytes.next(), Some(b) if b.is_ascii_lowercase() || b == b'_')
        && schema.len() <= 63
        && schema
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

fn invalid(message: String) -> BackplaneError {
    BackplaneError::Backend {
        message,
        transient: false,
        source: None,
    }
}

/// Whether a database error may go away by itself (the link, the server's state).
fn is_transient(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Database(db) => {
            let code = db.code().unwrap_or_default();
            // 08: connection exception; 57: operator intervention (shutdown); 53:
            // insufficient resources; 40: rollback (serialization, deadlock).
            ["08", "57", "53", "40"]
                .iter()
                .any(|class| code.starts_with(class))
        }
        sqlx::Error::Configuration(_)
        | sqlx::Error::ColumnDecode { .. }
        | sqlx::Error::ColumnNotFound(_)
        | sqlx::Error::ColumnIndexOutOfBounds { .. }
        | sqlx::Error::TypeNotFound { .. }
        | sqlx::Error::Decode(_)
        | sqlx::Error::RowNotFound
        | sqlx::Error::Migrate(_) => false,
        _ => true,
    }
}

fn db_error(context: &str, error: sqlx::Error) -> BackplaneError {
    let message = format!("{context}: {error}");
    if is_transient(&error) {
        BackplaneError::Unavailable {
            message,
            source: Some(Box::new(error)),
        }
    } else {
        BackplaneError::Backend {
            message,
            transient: false,
            source: Some(Box::new(error)),
        }
    }
}

fn stopped_error(operation: &str) -> BackplaneError {
    BackplaneError::Unavailable {
        message: format!("{operation} on a stopped PostgreSQL backplane"),
        source: None,
    }
}

impl Shared {
    fn outbox(&self) -> MutexGuard<'_, Outbox> {
        lock(&self.outbox)
    }

    fn set_down(&self, slot: &Mutex<Option<String>>, what: &str, reason: Option<String>) {
        let mut current = lock(slot);
        match (&*current, &reason) {
            (None, Some(why)) => tracing::warn!(link = what, reason = %why, "PostgreSQL link down"),
            (Some(_), None) => tracing::info!(link = what, "PostgreSQL link up again"),
            _ => {}
        }
        *current = reason;
    }

    fn stopped(&self) -> bool {
        *self.stop.borrow()
    }

    /// Answers `entry` and releases its room in the outbox.
    fn answer(&self, entry: Entry, result: Result<u64, BackplaneError>) {
        {
            let mut outbox = self.outbox();
            outbox.messages = outbox.messages.saturating_sub(1);
            outbox.bytes = outbox.bytes.saturating_sub(entry.bytes);
        }
        let _ = entry.answer.send(result);
    }

    /// Fails every entry whose deadline passed.
    fn expire(&self) {
        let now = Instant::now();
        let expired: Vec<Entry> = {
            let mut outbox = self.outbox();
            let (old, keep): (Vec<Entry>, Vec<Entry>) =
                outbox.queue.drain(..).partition(|e| e.deadline <= now);
            outbox.queue = keep.into();
            old
        };
        for entry in expired {
            let age = self.config.buffer_age;
            self.answer(
                entry,
                Err(BackplaneError::Backlogged {
                    message: format!("PostgreSQL was not reachable for {age:?}"),
                }),
            );
        }
    }

    fn fail_all(&self) {
        let all: Vec<Entry> = self.outbox().queue.drain(..).collect();
        for entry in all {
            self.answer(entry, Err(stopped_error("a call")));
        }
    }
}

struct Backoff(Duration);

impl Backoff {
    fn new() -> Self {
        Self(Duration::from_millis(50))
    }

    fn next(&mut self) -> Duration {
        let now = self.0;
        self.0 = (self.0 * 2).min(MAX_BACKOFF);
        now
    }
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// Creates the schema (racing nodes may both try) and runs the migrations (the migrator
/// takes an advisory lock).
async fn prepare(pool: &PgPool, schema: &str) -> Result<(), BackplaneError> {
    let create = format!("CREATE SCHEMA IF NOT EXISTS \"{schema}\"");
    if let Err(e) = sqlx::query(&create).execute(pool).await {
        let raced = matches!(&e, sqlx::Error::Database(db)
            if matches!(db.code().as_deref(), Some("23505") | Some("42P06")));
        if !raced {
            return Err(db_error("creating the schema", e));
        }
    }
    MIGRATOR.run(pool).await.map_err(|e| match e {
        sqlx::migrate::MigrateError::Execute(inner) => db_error("migrating", inner),
        other => invalid(format!("migrating: {other}")),
    })
}

/// Renews this node's presence; `true` when the row had to be created again.
async fn renew(pool: &PgPool, node: &str, ttl: Duration) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar::<_, bool>(
        "INSERT INTO nodes (node, alive_until) VALUES ($1, now() + $2 * interval '1 millisecond') \
         ON CONFLICT (node) DO UPDATE SET alive_until = EXCLUDED.alive_until \
         RETURNING (xmax = 0)",
    )
    .bind(node)
    .bind(millis(ttl))
    .fetch_one(pool)
    .await
}

/// The outbox writer: flushes entries in order, renews presence, trims old rows.
struct Writer {
    shared: Arc<Shared>,
    pool: PgPool,
    node: String,
    subscriptions: BTreeSet<String>,
}

impl Writer {
    async fn run(mut self) {
        let config = self.shared.config.clone();
        let refresh = (config.presence_ttl / 3).max(Duration::from_millis(10));
        let mut next_refresh = Instant::now() + refresh;
        let mut backoff = Backoff::new();
        let mut stop = self.shared.stop.subscribe();
        loop {
            if self.shared.stopped() {
                return;
            }
            if Instant::now() >= next_refresh {
                match timeout(config.command_timeout, self.maintain()).await {
                    Ok(Ok(())) => next_refresh = Instant::now() + refresh,
                    Ok(Err(e)) => {
                        tracing::debug!(error = %e, "presence renewal failed");
                        next_refresh = Instant::now() + backoff.next();
                    }
                    Err(_) => next_refresh = Instant::now() + backoff.next(),
                }
            }
            self.shared.expire();
            let batch: Vec<Entry> = {
                let mut outbox = self.shared.outbox();
                let n = outbox.queue.len().min(BATCH);
                outbox.queue.drain(..n).collect()
            };
            if batch.is_empty() {
                tokio::select! {
                    _ = self.shared.work.notified() => {}
                    _ = tokio::time::sleep_until(next_refresh) => {}
                    _ = stop.changed() => return,
                }
                continue;
            }
            let outcome = timeout(config.command_timeout, self.write(&batch)).await;
            match outcome {
                Ok(Ok(reaches)) => {
                    self.shared
                        .set_down(&self.shared.writer_down, "writer", None);
                    backoff = Backoff::new();
                    for (entry, reach) in batch.into_iter().zip(reaches) {
                        match &entry.op {
                            Op::Subscribe(channel) => {
                                self.subscriptions.insert(channel.clone());
                            }
                            Op::Unsubscribe(channel) => {
                                self.subscriptions.remove(channel);
                            }
                            _ => {}
                        }
                        self.shared.answer(entry, Ok(reach));
                    }
                }
                Ok(Err(e)) if !is_transient(&e) => {
                    tracing::error!(error = %e, "PostgreSQL refused a batch");
                    let message = format!("writing to PostgreSQL: {e}");
                    for entry in batch {
                        self.shared.answer(entry, Err(invalid(message.clone())));
                    }
                }
                failed => {
                    let reason = match failed {
                        Ok(Err(e)) => e.to_string(),
                        _ => format!("no answer within {:?}", config.command_timeout),
                    };
                    self.shared
                        .set_down(&self.shared.writer_down, "writer", Some(reason));
                    {
                        let mut outbox = self.shared.outbox();
                        for entry in batch.into_iter().rev() {
                            outbox.queue.push_front(entry);
                        }
                    }
                    tokio::select! {
                        _ = sleep(backoff.next()) => {}
                        _ = stop.changed() => return,
                    }
                    // Presence may have lapsed during the outage: renew before flushing.
                    next_refresh = Instant::now();
                }
            }
        }
    }

    /// Presence, and the periodic trim of old rows and dead nodes.
    async fn maintain(&self) -> Result<(), sqlx::Error> {
        let config = &self.shared.config;
        let recreated = renew(&self.pool, &self.node, config.presence_ttl).await?;
        if recreated && !self.subscriptions.is_empty() {
            tracing::info!(node = %self.node, "presence was gone; subscribing again");
            let channels: Vec<String> = self.subscriptions.iter().cloned().collect();
            sqlx::query(
                "INSERT INTO subscriptions (channel, node) SELECT c, $2 FROM unnest($1::text[]) c \
                 ON CONFLICT DO NOTHING",
            )
            .bind(channels)
            .bind(&self.node)
            .execute(&self.pool)
            .await?;
        }
        sqlx::query("DELETE FROM inbox WHERE created_at < now() - $1 * interval '1 millisecond'")
            .bind(millis(config.retention))
            .execute(&self.pool)
            .await?;
        let grace = millis(config.presence_ttl);
        let dead: Vec<String> = sqlx::query_scalar(
            "DELETE FROM nodes WHERE alive_until < now() - $1 * interval '1 millisecond' \
             RETURNING node",
        )
        .bind(grace)
        .fetch_all(&self.pool)
        .await?;
        if !dead.is_empty() {
            tracing::info!(nodes = ?dead, "forgetting nodes whose presence expired");
            sqlx::query("DELETE FROM subscriptions WHERE node = ANY($1)")
                .bind(&dead)
                .execute(&self.pool)
                .await?;
            sqlx::query("DELETE FROM inbox WHERE target = ANY($1)")
                .bind(&dead)
                .execute(&self.pool)
                .await?;
        }
        Ok(())
    }

    /// Writes one batch in one transaction; the reach of each entry.
    async fn write(&self, batch: &[Entry]) -> Result<Vec<u64>, sqlx::Error> {
        let schema = &self.shared.config.schema;
        let token = &self.shared.writer_token;
        let mut tx = self.pool.begin().await?;
        let mut reaches = Vec::with_capacity(batch.len());
        let mut wake: BTreeSet<String> = BTreeSet::new();
        for entry in batch {
            let wseq = i64::try_from(entry.seq).unwrap_or(i64::MAX);
            let targets: Vec<String> = match &entry.op {
                Op::ToNode { node, row } => {
                    sqlx::query_scalar(
                        "INSERT INTO inbox (target, writer, wseq, payload) \
                         SELECT node, $2, $3, $4 FROM nodes \
                         WHERE node = $1 AND alive_until > now() RETURNING target",
                    )
                    .bind(node)
                    .bind(token)
                    .bind(wseq)
                    .bind(row.as_ref())
                    .fetch_all(&mut *tx)
                    .await?
                }
                Op::ToChannel { channel, row } => {
                    sqlx::query_scalar(
                        "INSERT INTO inbox (target, writer, wseq, payload) \
                         SELECT s.node, $2, $3, $4 FROM subscriptions s \
                         JOIN nodes n ON n.node = s.node AND n.alive_until > now() \
                         WHERE s.channel = $1 ORDER BY s.node RETURNING target",
                    )
                    .bind(channel)
                    .bind(token)
                    .bind(wseq)
                    .bind(row.as_ref())
                    .fetch_all(&mut *tx)
                    .await?
                }
                Op::Subscribe(channel) => {
                    sqlx::query(
                        "INSERT INTO subscriptions (channel, node) VALUES ($1, $2) \
                         ON CONFLICT DO NOTHING",
                    )
                    .bind(channel)
                    .bind(&self.node)
                    .execute(&mut *tx)
                    .await?;
                    Vec::new()
                }
                Op::Unsubscribe(channel) => {
                    sqlx::query("DELETE FROM subscriptions WHERE channel = $1 AND node = $2")
                        .bind(channel)
                        .bind(&self.node)
                        .execute(&mut *tx)
                        .await?;
                    Vec::new()
                }
            };
            reaches.push(targets.len() as u64);
            wake.extend(targets);
        }
        if !wake.is_empty() {
            let bells: Vec<String> = wake.iter().map(|n| doorbell(schema, n)).collect();
            sqlx::query("SELECT pg_notify(c, '') FROM unnest($1::text[]) c")
                .bind(bells)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(reaches)
    }
}

/// The highest outbox number seen per writer token: a writer writes in outbox order and
/// writes a failed batch again in the same order, so anything at or below it is a copy.
#[derive(Default)]
struct Seen {
    last: HashMap<String, i64>,
}

impl Seen {
    fn first_time(&mut self, writer: &str, seq: i64) -> bool {
        match self.last.get_mut(writer) {
            Some(last) if seq <= *last => false,
            Some(last) => {
                *last = seq;
                true
            }
            None => {
                if self.last.len() >= MAX_WRITERS_REMEMBERED {
                    self.last.clear();
                }
                self.last.insert(writer.to_owned(), seq);
                true
            }
        }
    }
}

/// The inbox reader: drains this node's rows on every doorbell, reconnect and poll.
struct Reader {
    shared: Arc<Shared>,
    pool: PgPool,
    node: String,
    inbox: Arc<dyn Inbox>,
    seen: Seen,
}

type Row = (i64, String, i64, Vec<u8>);

impl Reader {
    async fn run(mut self) {
        let config = self.shared.config.clone();
        let bell = doorbell(&config.schema, &self.node);
        let mut stop = self.shared.stop.subscribe();
        let mut listener: Option<PgListener> = None;
        let mut backoff = Backoff::new();
        loop {
            if self.shared.stopped() {
                return;
            }
            if listener.is_none() {
                let connect = async {
                    let mut l = PgListener::connect_with(&self.pool).await?;
                    l.listen(&bell).await?;
                    Ok::<_, sqlx::Error>(l)
                };
                match timeout(config.command_timeout, connect).await {
                    Ok(Ok(l)) => {
                        listener = Some(l);
                        backoff = Backoff::new();
                    }
                    Ok(Err(e)) => self.down(format!("listening: {e}")),
                    Err(_) => self.down(format!(
                        "listening: no answer within {:?}",
                        config.command_timeout
                    )),
                }
                // Catch up at start and after every reconnect, listening or not.
                self.drain().await;
                if listener.is_none() {
                    tokio::select! {
                        _ = sleep(backoff.next().min(config.poll_interval)) => {}
                        _ = stop.changed() => return,
                    }
                }
                continue;
            }
            let Some(l) = listener.as_mut() else { continue };
            tokio::select! {
                received = l.try_recv() => match received {
                    Ok(Some(_)) => {}
                    // The connection was lost; the next call reconnects and listens again.
                    // Notifications in between are lost: catch up below.
                    Ok(None) => tracing::debug!("listener reconnecting"),
                    Err(e) => {
                        self.down(format!("listener: {e}"));
                        listener = None;
                    }
                },
                _ = sleep(config.poll_interval) => {}
                _ = stop.changed() => return,
            }
            self.drain().await;
        }
    }

    fn down(&self, reason: String) {
        self.shared
            .set_down(&self.shared.reader_down, "reader", Some(reason));
    }

    /// Takes and delivers every row of this node, in `seq` order.
    async fn drain(&mut self) {
        let command_timeout = self.shared.config.command_timeout;
        loop {
            // Rows are deleted in a transaction committed after delivery: if the link dies
            // first, the rows stay and come back, and `seen` drops the copies.
            let taken = timeout(command_timeout, async {
                let mut tx = self.pool.begin().await?;
                let rows = sqlx::query_as::<_, Row>(
                    "DELETE FROM inbox WHERE seq IN (SELECT seq FROM inbox WHERE target = $1 \
                     ORDER BY seq LIMIT $2) RETURNING seq, writer, wseq, payload",
                )
                .bind(&self.node)
                .bind(DRAIN)
                .fetch_all(&mut *tx)
                .await?;
                Ok::<_, sqlx::Error>((tx, rows))
            })
            .await;
            let (tx, mut rows) = match taken {
                Ok(Ok(taken)) => taken,
                Ok(Err(e)) => return self.down(format!("reading the inbox: {e}")),
                Err(_) => {
                    return self.down(format!(
                        "reading the inbox: no answer within {command_timeout:?}"
                    ));
                }
            };
            self.shared
                .set_down(&self.shared.reader_down, "reader", None);
            let full = rows.len() as i64 >= DRAIN;
            rows.sort_by_key(|row| row.0);
            for (seq, writer, wseq, payload) in rows {
                if !self.seen.first_time(&writer, wseq) {
                    tracing::debug!(seq, writer, wseq, "dropping a copy");
                    continue;
                }
                match Message::decode(Bytes::from(payload)) {
                    Ok(message) => {
                        if self.shared.stopped() {
                            return;
                        }
                        self.inbox.receive(message).await;
                    }
                    Err(e) => tracing::warn!(seq, error = %e, "dropping a corrupt message"),
                }
            }
            match timeout(command_timeout, tx.commit()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return self.down(format!("consuming the inbox: {e}")),
                Err(_) => {
                    return self.down(format!(
                        "consuming the inbox: no answer within {command_timeout:?}"
                    ));
                }
            }
            if !full {
                return;
            }
        }
    }
}

impl fmt::Debug for PostgresBackplane {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresBackplane")
            .field("schema", &self.shared.config.schema)
            .field("prefix", &self.shared.config.channel_names.prefix())
            .field("health", &self.health())
            .finish_non_exhaustive()
    }
}

static INSTANCES: AtomicU64 = AtomicU64::new(0);

impl PostgresBackplane {
    /// A backplane for `config`. Checks the URL, the schema name and the bounds; no I/O
    /// until [`start`](Backplane::start).
    ///
    /// # Errors
    ///
    /// A permanent [`BackplaneError::Backend`] for a URL that does not parse, a schema name
    /// outside `a-z 0-9 _` (at most 63 bytes, not starting with a digit) or a zero bound.
    pub fn new(config: PostgresConfig) -> Result<Self, BackplaneError> {
        if !valid_schema(&config.schema) {
            return Err(invalid(format!(
                "invalid schema name {:?}: use 1 to 63 characters from a-z, 0-9 and '_', \
                 not starting with a digit",
                config.schema
            )));
        }
        let options = PgConnectOptions::from_str(&config.url)
            .map_err(|e| invalid(format!("invalid PostgreSQL URL: {e}")))?
            .options([("search_path", config.schema.as_str())])
            .application_name("switchboard-backplane");
        for (what, zero) in [
            ("max_payload", config.max_payload == 0),
            ("buffer_messages", config.buffer_messages == 0),
            ("buffer_bytes", config.buffer_bytes == 0),
            ("poll_interval", config.poll_interval.is_zero()),
            ("presence_ttl", config.presence_ttl.is_zero()),
            ("command_timeout", config.command_timeout.is_zero()),
        ] {
            if zero {
                return Err(invalid(format!("{what} must be positive")));
            }
        }
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        let writer_token = format!(
            "{}-{nanos:x}-{}",
            std::process::id(),
            INSTANCES.fetch_add(1, AtomicOrdering::Relaxed)
        );
        Ok(Self {
            shared: Arc::new(Shared {
                config,
                options,
                writer_token,
                phase: Mutex::new(Phase::New),
                outbox: Mutex::new(Outbox::default()),
                work: Notify::new(),
                stop: watch::channel(false).0,
                writer_down: Mutex::new(None),
                reader_down: Mutex::new(None),
            }),
            tasks: Mutex::new(Vec::new()),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &PostgresConfig {
        &self.shared.config
    }

    fn running(&self, operation: &str) -> Result<(), BackplaneError> {
        match &*lock(&self.shared.phase) {
            Phase::Running { .. } => Ok(()),
            Phase::New => Err(BackplaneError::Backend {
                message: format!("{operation} before start"),
                transient: false,
                source: None,
            }),
            Phase::Stopped => Err(stopped_error(operation)),
        }
    }

    async fn submit(&self, op: Op, bytes: usize) -> Result<u64, BackplaneError> {
        let config = &self.shared.config;
        let (answer, answered) = oneshot::channel();
        {
            let mut outbox = self.shared.outbox();
            if outbox.messages >= config.buffer_messages {
                return Err(BackplaneError::Backlogged {
                    message: format!("{} entries wait in the outbox (its bound)", outbox.messages),
                });
            }
            if outbox.bytes.saturating_add(bytes) > config.buffer_bytes {
                return Err(BackplaneError::Backlogged {
                    message: format!(
                        "{} bytes wait in the outbox; {bytes} more would pass its bound of {}",
                        outbox.bytes, config.buffer_bytes
                    ),
                });
            }
            outbox.messages += 1;
            outbox.bytes += bytes;
            outbox.next_seq += 1;
            let seq = outbox.next_seq;
            outbox.queue.push_back(Entry {
                op,
                bytes,
                seq,
                deadline: Instant::now() + config.buffer_age,
                answer,
            });
        }
        self.shared.work.notify_one();
        let bound = config.buffer_age + config.command_timeout + Duration::from_secs(1);
        match timeout(bound, answered).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(stopped_error("a call")),
            Err(_) => Err(BackplaneError::Timeout(bound)),
        }
    }

    async fn subscription(&self, address: &Address, subscribe: bool) -> Result<(), BackplaneError> {
        if let Address::Node(_) = address {
            return Err(BackplaneError::unsupported(
                NAME,
                "subscribing to a node address",
            ));
        }
        self.running(if subscribe {
            "subscribe"
        } else {
            "unsubscribe"
        })?;
        let channel = self.shared.config.channel_names.channel(address);
        let bytes = channel.len();
        let op = if subscribe {
            Op::Subscribe(channel)
        } else {
            Op::Unsubscribe(channel)
        };
        self.submit(op, bytes).await.map(|_| ())
    }
}

#[async_trait]
impl Backplane for PostgresBackplane {
    fn capabilities(&self) -> BackplaneCapabilities {
        BackplaneCapabilities {
            name: NAME,
            delivery: DeliveryClass::Resumable,
            ordering: Ordering::PerSender,
            max_payload: self.shared.config.max_payload,
            node_addressed: true,
            channels: true,
            reach: true,
        }
    }

    /// Connects, creates the schema and tables if missing, registers the node's presence and
    /// starts the writer and reader tasks.
    ///
    /// Fails with a transient error when PostgreSQL cannot be reached within a few command
    /// timeouts.
    async fn start(&self, node: &NodeId, inbox: Arc<dyn Inbox>) -> Result<(), BackplaneError> {
        match &*lock(&self.shared.phase) {
            Phase::New => {}
            _ => return Err(invalid("start called twice".to_owned())),
        }
        let config = &self.shared.config;
        let pool = PgPoolOptions::new()
            .max_connections(4)
            .min_connections(0)
            .acquire_timeout(config.command_timeout)
            .connect_lazy_with(self.shared.options.clone());
        let bound = config.command_timeout * 4;
        let setup = async {
            prepare(&pool, &config.schema).await?;
            renew(&pool, node.as_str(), config.presence_ttl)
                .await
                .map_err(|e| db_error("registering the node", e))?;
            Ok::<(), BackplaneError>(())
        };
        match timeout(bound, setup).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                pool.close().await;
                return Err(e);
            }
            Err(_) => {
                pool.close().await;
                return Err(BackplaneError::Timeout(bound));
            }
        }
        {
            let mut phase = lock(&self.shared.phase);
            if !matches!(*phase, Phase::New) {
                return Err(invalid("start called twice".to_owned()));
            }
            *phase = Phase::Running {
                node: node.clone(),
                pool: pool.clone(),
            };
        }
        let writer = Writer {
            shared: Arc::clone(&self.shared),
            pool: pool.clone(),
            node: node.as_str().to_owned(),
            subscriptions: BTreeSet::new(),
        };
        let reader = Reader {
            shared: Arc::clone(&self.shared),
            pool,
            node: node.as_str().to_owned(),
            inbox,
            seen: Seen::default(),
        };
        let mut tasks = lock(&self.tasks);
        tasks.push(tokio::spawn(writer.run()));
        tasks.push(tokio::spawn(reader.run()));
        tracing::info!(%node, schema = %config.schema, "PostgreSQL backplane started");
        Ok(())
    }

    async fn publish(&self, message: &Message) -> Result<Reach, BackplaneError> {
        let max = self.shared.config.max_payload;
        if message.payload.len() > max {
            return Err(BackplaneError::TooLarge {
                size: message.payload.len(),
                max,
            });
        }
        self.running("publish")?;
        let row = message.encode();
        let bytes = row.len();
        let op = match &message.to {
            Address::Node(node) => Op::ToNode {
                node: node.as_str().to_owned(),
                row,
            },
            other => Op::ToChannel {
                channel: self.shared.config.channel_names.channel(other),
                row,
            },
        };
        self.submit(op, bytes).await.map(Reach::nodes)
    }

    async fn subscribe(&self, address: &Address) -> Result<(), BackplaneError> {
        self.subscription(address, true).await
    }

    async fn unsubscribe(&self, address: &Address) -> Result<(), BackplaneError> {
        self.subscription(address, false).await
    }

    fn health(&self) -> Health {
        match &*lock(&self.shared.phase) {
            Phase::New => return Health::Down("not started".to_owned()),
            Phase::Stopped => return Health::Down("stopped".to_owned()),
            Phase::Running { .. } => {}
        }
        let writer = lock(&self.shared.writer_down).clone();
        let reader = lock(&self.shared.reader_down).clone();
        match (writer, reader) {
            (None, None) => Health::Up,
            (Some(w), None) => Health::Down(format!("PostgreSQL writer link: {w}")),
            (None, Some(r)) => Health::Down(format!("PostgreSQL reader link: {r}")),
            (Some(w), Some(r)) => {
                Health::Down(format!("PostgreSQL writer link: {w}; reader link: {r}"))
            }
        }
    }

    /// Stops both tasks (nothing reaches the inbox once this returns), fails what waits in
    /// the outbox, and removes this node's presence, subscriptions and rows (best effort,
    /// within the command timeout).
    async fn stop(&self) {
        let previous = std::mem::replace(&mut *lock(&self.shared.phase), Phase::Stopped);
        self.shared.stop.send_replace(true);
        let tasks: Vec<JoinHandle<()>> = lock(&self.tasks).drain(..).collect();
        for task in tasks {
            task.abort();
            let _ = task.await;
        }
        self.shared.fail_all();
        if let Phase::Running { node, pool } = previous {
            let node = node.as_str();
            let goodbye = async {
                sqlx::query("DELETE FROM nodes WHERE node = $1")
                    .bind(node)
                    .execute(&pool)
                    .await?;
                sqlx::query("DELETE FROM subscriptions WHERE node = $1")
                    .bind(node)
                    .execute(&pool)
                    .await?;
                sqlx::query("DELETE FROM inbox WHERE target = $1")
                    .bind(node)
                    .execute(&pool)
                    .await?;
                Ok::<(), sqlx::Error>(())
            };
            match timeout(self.shared.config.command_timeout, goodbye).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::debug!(error = %e, "could not deregister the node"),
                Err(_) => tracing::debug!("deregistering the node timed out"),
            }
            let _ = timeout(self.shared.config.command_timeout, pool.close()).await;
            tracing::info!(%node, "PostgreSQL backplane stopped");
        }
    }
}

impl Drop for PostgresBackplane {
    fn drop(&mut self) {
        self.shared.stop.send_replace(true);
        for task in lock(&self.tasks).drain(..) {
            task.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doorbells_are_short_and_distinct() {
        let a = doorbell("s", "node-a");
        assert_eq!(a.len(), 43);
        assert_ne!(a, doorbell("s", "node-b"));
        assert_ne!(a, doorbell("t", "node-a"));
    }

    #[test]
    fn copies_are_dropped() {
        let mut seen = Seen::default();
        assert!(seen.first_time("w", 1));
        assert!(seen.first_time("w", 2));
        assert!(!seen.first_time("w", 2));
        assert!(!seen.first_time("w", 1));
        assert!(seen.first_time("v", 1));
    }

    #[test]
    fn configuration_is_checked_without_io() {
        let ok = PostgresBackplane::new(PostgresConfig::new("postgres://u@127.0.0.1:1/db"));
        assert!(ok.is_ok());
        for schema in ["", "1abc", "Abc", "a-b", &"a".repeat(64)] {
            let config = PostgresConfig::new("postgres://u@127.0.0.1:1/db").with_schema(schema);
            assert!(PostgresBackplane::new(config).is_err(), "{schema:?}");
        }
        let zero = PostgresConfig::new("postgres://u@127.0.0.1:1/db").with_max_payload(0);
        assert!(PostgresBackplane::new(zero).is_err());
    }
}
