//! [`RedisBackplane`]: the writer task, the reader task and the [`Backplane`] implementation.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering as AtomicOrdering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Client, RedisError, Script, Value};
use switchboard_core::backplane::Ordering;
use switchboard_core::{
    Address, Backplane, BackplaneCapabilities, BackplaneError, ChannelNames, DeliveryClass, Health,
    Inbox, Message, NodeId, Reach,
};
use tokio::sync::{Notify, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep_until, timeout};

use crate::{RedisBackplaneError, RedisConfig};

/// First reconnect delay.
pub(crate) const RECONNECT_MIN_DELAY: Duration = Duration::from_millis(100);
/// Longest reconnect delay, jitter included.
pub(crate) const RECONNECT_MAX_DELAY: Duration = Duration::from_secs(1);
/// How long the reader's `XREAD` blocks when nothing arrives.
pub(crate) const READ_BLOCK: Duration = Duration::from_secs(1);
/// How often an idle writer checks its link, so it notices a lost Redis (and registers
/// again) without waiting for the next publication.
const IDLE_CHECK: Duration = Duration::from_secs(1);
/// Most outbox entries sent in one pipeline.
const MAX_BATCH: usize = 256;
/// Most inbox entries read by one `XREAD`.
const READ_COUNT: usize = 64;
/// Most encoded bytes sent in one pipeline (a batch holds at least one entry, however large).
const MAX_BATCH_BYTES: usize = 4 * 1024 * 1024;
/// How many writers a reader remembers for dropping duplicates.
const MAX_WRITERS_REMEMBERED: usize = 4096;

/// How the settle period after a Redis restart ended.
enum Settled {
    Done,
    Stopped,
    Lost(String),
}

/// Publishes to one node's inbox if that node is alive.
///
/// `KEYS[1]` inbox stream, `KEYS[2]` its alive key; `ARGV` max length, message, writer,
/// writer sequence. Returns 1 when written, 0 when the node is not alive.
const NODE_SCRIPT: &str = r"
if redis.call('EXISTS', KEYS[2]) == 0 then return 0 end
redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'm', ARGV[2], 'w', ARGV[3], 'n', ARGV[4])
return 1
";

/// Publishes to the inbox of every alive member of a channel, and forgets dead members.
///
/// `KEYS[1]` the channel's members set (of inbox stream names); `ARGV` as [`NODE_SCRIPT`].
/// A member's alive key is its inbox name followed by `:alive`, as [`alive_key`] builds it.
/// Returns the number of inboxes written.
const CHANNEL_SCRIPT: &str = r"
local reached = 0
for _, inbox in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if redis.call('EXISTS', inbox .. ':alive') == 1 then
    redis.call('XADD', inbox, 'MAXLEN', '~', ARGV[1], '*', 'm', ARGV[2], 'w', ARGV[3], 'n', ARGV[4])
    reached = reached + 1
  else
    redis.call('SREM', KEYS[1], inbox)
  end
end
return reached
";

/// Sets the alive key and answers the id of the inbox's last entry (`0-0` when empty), in one
/// step, so every message written for this node after it is alive comes after that id.
///
/// `KEYS[1]` inbox, `KEYS[2]` alive key; `ARGV[1]` the alive key's lifetime in ms.
const REGISTER_SCRIPT: &str = r"
local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
redis.call('SET', KEYS[2], '1', 'PX', ARGV[1])
if #last == 0 then return '0-0' end
return last[1][1]
";

/// Creates the epoch if there is none and answers the current one.
///
/// `KEYS[1]` epoch key; `ARGV[1]` a fresh random value.
const EPOCH_SCRIPT: &str = r"
redis.call('SET', KEYS[1], ARGV[1], 'NX')
return redis.call('GET', KEYS[1])
";

/// The alive key of the node whose inbox stream is `inbox`.
pub(crate) fn alive_key(inbox: &str) -> String {
    format!("{inbox}:alive")
}

/// The members set of a channel address.
pub(crate) fn members_key(names: &ChannelNames, address: &Address) -> String {
    format!("{}:members", names.channel(address))
}

/// The epoch key of a prefix.
pub(crate) fn epoch_key(names: &ChannelNames) -> String {
    format!("{}:epoch", names.prefix())
}

/// A Redis backplane endpoint for one node. See the [crate documentation](crate) for the key
/// layout, the guarantees and the outage behaviour.
pub struct RedisBackplane {
    shared: Arc<Shared>,
    phase: Mutex<Phase>,
}

/// What the tasks and the endpoint share.
struct Shared {
    config: RedisConfig,
    client: Client,
    outbox: Mutex<Outbox>,
    work: Notify,
    /// The inbox position up to which the reader handed everything over, for the writer to
    /// trim.
    trim_to: Mutex<Option<String>>,
    links: Mutex<Links>,
    /// Set by the reader when it finds Redis lost its data, so the writer registers again
    /// at once.
    restart_seen: Mutex<Option<String>>,
    stopping: AtomicBool,
    stop: watch::Sender<bool>,
    /// Random per endpoint: lets a receiver drop the duplicates a retried batch can write.
    writer_token: String,
    node_script: Script,
    channel_script: Script,
}

/// The endpoint's life.
enum Phase {
    New,
    Running(Running),
    Stopped,
}

struct Running {
    node: NodeId,
    writer: JoinHandle<BTreeSet<String>>,
    reader: JoinHandle<()>,
}

/// Entries waiting for the writer, and what they weigh (queued or in flight).
#[derive(Default)]
struct Outbox {
    queue: VecDeque<Entry>,
    messages: usize,
    bytes: usize,
    next_seq: u64,
}

/// One piece of work for the writer.
struct Entry {
    op: Op,
    bytes: usize,
    seq: u64,
    deadline: Instant,
    answer: oneshot::Sender<Result<Reach, BackplaneError>>,
}

#[derive(Clone)]
enum Op {
    Node { inbox: String, message: Bytes },
    Channel { members: String, message: Bytes },
    Subscribe { members: String },
    Unsubscribe { members: String },
}

/// Which of the two links are down, and why.
#[derive(Default)]
struct Links {
    writer: Option<String>,
    reader: Option<String>,
    /// An outage was announced and its end not yet.
    outage: bool,
}

#[derive(Clone, Copy)]
enum Link {
    Writer,
    Reader,
}

impl Link {
    fn name(self) -> &'static str {
        match self {
            Self::Writer => "writer",
            Self::Reader => "reader",
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every update under these locks is a single step; a panic elsewhere leaves them whole.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    fn outbox(&self) -> MutexGuard<'_, Outbox> {
        lock(&self.outbox)
    }

    fn link_down(&self, link: Link, reason: String) {
        let mut links = lock(&self.links);
        let announce = !links.outage;
        links.outage = true;
        if announce {
            tracing::warn!(
                link = link.name(),
                reason = %reason,
                "the Redis backplane lost its link; messages wait in the outbox while it reconnects"
            );
        }
        match link {
            Link::Writer => links.writer = Some(reason),
            Link::Reader => links.reader = Some(reason),
        }
    }

    fn link_up(&self, link: Link) {
        let mut links = lock(&self.links);
        match link {
            Link::Writer => links.writer = None,
            Link::Reader => links.reader = None,
        }
        if links.writer.is_none() && links.reader.is_none() && links.outage {
            links.outage = false;
            tracing::info!("the Redis backplane is connected again");
        }
    }

    fn stopped(&self) -> bool {
        self.stopping.load(AtomicOrdering::SeqCst)
    }

    /// Waits until `stop` is called.
    async fn until_stopped(&self) {
        let mut stop = self.stop.subscribe();
        let _ = stop.wait_for(|stopping| *stopping).await;
    }

    /// Answers every entry whose deadline passed with [`BackplaneError::Backlogged`].
    fn expire(&self) {
        let now = Instant::now();
        let mut expired = Vec::new();
        {
            let mut outbox = self.outbox();
            while outbox.queue.front().is_some_and(|e| e.deadline <= now) {
                if let Some(entry) = outbox.queue.pop_front() {
                    outbox.messages -= 1;
                    outbox.bytes -= entry.bytes;
                    expired.push(entry);
                }
            }
        }
        let age = self.config.buffer_age;
        for entry in expired {
            let _ = entry.answer.send(Err(BackplaneError::Backlogged {
                message: format!(
                    "not sent within the buffer age of {age:?}: Redis is unreachable or too slow"
                ),
            }));
        }
    }

    /// The deadline of the oldest waiting entry.
    fn oldest_deadline(&self) -> Option<Instant> {
        self.outbox().queue.front().map(|e| e.deadline)
    }

    /// Sleeps until `until`, answering entries as they expire; false when stopped.
    async fn wait_expiring(&self, until: Instant) -> bool {
        loop {
            self.expire();
            if self.stopped() {
                return false;
            }
            let now = Instant::now();
            if now >= until {
                return true;
            }
            let wake = self.oldest_deadline().map_or(until, |d| d.min(until));
            tokio::select! {
                () = sleep_until(wake) => {}
                () = self.until_stopped() => return false,
            }
        }
    }

    /// Puts entries taken for a batch back at the front, in order.
    fn requeue(&self, entries: Vec<Entry>) {
        let mut outbox = self.outbox();
        for entry in entries.into_iter().rev() {
            outbox.queue.push_front(entry);
        }
    }

    /// Answers an entry that left the outbox.
    fn answer(&self, entry: Entry, result: Result<Reach, BackplaneError>) {
        {
            let mut outbox = self.outbox();
            outbox.messages -= 1;
            outbox.bytes -= entry.bytes;
        }
        let _ = entry.answer.send(result);
    }

    /// Fails everything still waiting (at stop).
    fn fail_all(&self) {
        let entries: Vec<Entry> = self.outbox().queue.drain(..).collect();
        for entry in entries {
            self.answer(entry, Err(stopped_error("the call")));
        }
    }

    async fn connect(
        &self,
        response_timeout: Duration,
    ) -> Result<MultiplexedConnection, RedisError> {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.config.command_timeout))
            .set_response_timeout(Some(response_timeout));
        self.client
            .get_multiplexed_async_connection_with_config(&config)
            .await
    }

    /// Runs [`EPOCH_SCRIPT`]: the current epoch, created if missing.
    async fn epoch(&self, conn: &mut MultiplexedConnection) -> Result<String, RedisError> {
        let fresh = format!("{:016x}", rand::random::<u64>());
        redis::cmd("EVAL")
            .arg(EPOCH_SCRIPT)
            .arg(1)
            .arg(epoch_key(&self.config.channel_names))
            .arg(fresh)
            .query_async(conn)
            .await
    }
}

/// A failure to reach or use Redis: can retrying help, and the words for it.
struct LinkError {
    fatal: bool,
    message: String,
    source: RedisError,
}

impl LinkError {
    fn from_redis(context: &str, source: RedisError) -> Self {
        let fatal = is_auth_error(&source);
        let message = if fatal {
            format!(
                "{context}: Redis refused the credentials in the URL (check the user and password): {source}"
            )
        } else {
            format!("{context}: {source}")
        };
        Self {
            fatal,
            message,
            source,
        }
    }

    fn into_backplane_error(self) -> BackplaneError {
        if self.fatal {
            BackplaneError::Backend {
                message: self.message,
                transient: false,
                source: Some(Box::new(self.source)),
            }
        } else {
            BackplaneError::Unavailable {
                message: self.message,
                source: Some(Box::new(self.source)),
            }
        }
    }
}

/// Whether Redis refused our credentials (retrying with the same URL cannot help).
fn is_auth_error(error: &RedisError) -> bool {
    if matches!(error.kind(), redis::ErrorKind::AuthenticationFailed) {
        return true;
    }
    if matches!(error.code(), Some("WRONGPASS" | "NOAUTH" | "NOPERM")) {
        return true;
    }
    let text = error.to_string();
    text.contains("WRONGPASS") || text.contains("without any password configured")
}

/// Whether a command's error reply can go away by itself.
fn is_transient_reply(error: &RedisError) -> bool {
    if error.is_io_error() || error.is_timeout() || error.is_connection_dropped() {
        return true;
    }
    matches!(
        error.code(),
        Some("OOM" | "LOADING" | "BUSY" | "TRYAGAIN" | "MASTERDOWN" | "READONLY")
    )
}

fn stopped_error(operation: &str) -> BackplaneError {
    BackplaneError::Backend {
        message: format!("{operation} on a Redis backplane that is not running"),
        transient: false,
        source: None,
    }
}

/// Capped exponential backoff with jitter: each delay is between half and all of the
/// current step, which doubles from [`RECONNECT_MIN_DELAY`] up to [`RECONNECT_MAX_DELAY`].
struct Backoff {
    step: Duration,
}

impl Backoff {
    fn new() -> Self {
        Self {
            step: RECONNECT_MIN_DELAY,
        }
    }

    fn next(&mut self) -> Duration {
        let step = self.step;
        self.step = (self.step * 2).min(RECONNECT_MAX_DELAY);
        let half = step / 2;
        let jitter_ms = u64::try_from(half.as_millis()).unwrap_or(u64::MAX);
        half + Duration::from_millis(rand::random_range(0..=jitter_ms))
    }

    fn reset(&mut self) {
        self.step = RECONNECT_MIN_DELAY;
    }
}

/// What the writer knows across reconnects.
struct Writer {
    shared: Arc<Shared>,
    inbox: String,
    alive: String,
    /// Members keys this node belongs to, re-added after every reconnect.
    subscriptions: BTreeSet<String>,
    epoch: Option<String>,
    /// Publications written in the last [`RESEND_WINDOW`], oldest first: when Redis loses
    /// its data, those its receivers had not read yet are gone with it, so they are written
    /// again (receivers drop the copies they already had, by writer token and sequence).
    recent: VecDeque<(Instant, Op, u64)>,
}

/// Beyond one reconnect delay, how long a node waits after a Redis restart for the others to
/// register again.
const SETTLE_MARGIN: Duration = Duration::from_secs(1);

/// How far back a restart that lost Redis's data makes a node write its publications again.
const RESEND_WINDOW: Duration = Duration::from_secs(2);

/// Most publications kept for writing again.
const RESEND_MAX: usize = 10_000;

impl Writer {
    /// Connects and registers this node: epoch, scripts, alive key, subscriptions.
    async fn register(
        &mut self,
        first: &mut Option<watch::Sender<Option<(String, String)>>>,
    ) -> Result<(MultiplexedConnection, bool), LinkError> {
        let shared = Arc::clone(&self.shared);
        let config = &shared.config;
        let mut conn = shared
            .connect(config.command_timeout)
            .await
            .map_err(|e| LinkError::from_redis("connecting", e))?;
        let epoch = shared
            .epoch(&mut conn)
            .await
            .map_err(|e| LinkError::from_redis("reading the epoch", e))?;
        let restarted = self.epoch.as_ref().is_some_and(|known| *known != epoch);
        let mut pipe = redis::pipe();
        pipe.cmd("SCRIPT")
            .arg("LOAD")
            .arg(NODE_SCRIPT)
            .ignore()
            .cmd("SCRIPT")
            .arg("LOAD")
            .arg(CHANNEL_SCRIPT)
            .ignore()
            .cmd("EVAL")
            .arg(REGISTER_SCRIPT)
            .arg(2)
            .arg(&self.inbox)
            .arg(&self.alive)
            .arg(millis(config.alive_ttl));
        for members in &self.subscriptions {
            pipe.cmd("SADD").arg(members).arg(&self.inbox).ignore();
        }
        let (position,): (String,) = pipe
            .query_async(&mut conn)
            .await
            .map_err(|e| LinkError::from_redis("registering", e))?;
        if let Some(tx) = first.take() {
            let _ = tx.send(Some((position, epoch.clone())));
        }
        if restarted {
            tracing::info!(
                "Redis restarted without its data; this node registered again and waits for the others"
            );
        }
        self.epoch = Some(epoch);
        Ok((conn, restarted))
    }

    /// Registers, serves the outbox and reconnects until the endpoint stops; returns the
    /// memberships this node held.
    async fn run(
        mut self,
        started: oneshot::Sender<Result<(), LinkError>>,
        first: watch::Sender<Option<(String, String)>>,
    ) -> BTreeSet<String> {
        let mut started = Some(started);
        let mut first = Some(first);
        let mut backoff = Backoff::new();
        let mut refused = false;
        let settle = RECONNECT_MAX_DELAY + SETTLE_MARGIN;
        loop {
            if self.shared.stopped() {
                break;
            }
            let (mut conn, restarted) = match self.register(&mut first).await {
                Ok(registered) => registered,
                Err(error) => {
                    let fatal = error.fatal;
                    if fatal && !refused {
                        // Once per refusal, not per attempt: the credentials may be fixed
                        // on the Redis side, so the writer keeps trying.
                        tracing::error!(error = %error.message, "the Redis backplane cannot log in");
                    }
                    refused = fatal;
                    self.shared.link_down(Link::Writer, error.message.clone());
                    if let Some(tx) = started.take() {
                        let _ = tx.send(Err(error));
                        if fatal {
                            return self.subscriptions;
                        }
                    }
                    let until = Instant::now() + backoff.next();
                    if !self.shared.wait_expiring(until).await {
                        break;
                    }
                    continue;
                }
            };
            backoff.reset();
            if let Some(tx) = started.take() {
                let _ = tx.send(Ok(()));
            }
            if restarted {
                self.resend_recent();
                // The other nodes re-register within one reconnect delay plus one command.
                // Meanwhile this node stays alive for them: its alive key may be shorter
                // than the settle period.
                match self.settle(&mut conn, settle).await {
                    Settled::Done => {}
                    Settled::Stopped => break,
                    Settled::Lost(reason) => {
                        self.shared.link_down(Link::Writer, reason);
                        let until = Instant::now() + backoff.next();
                        if !self.shared.wait_expiring(until).await {
                            break;
                        }
                        continue;
                    }
                }
            }
            self.shared.link_up(Link::Writer);
            match self.serve(&mut conn).await {
                Served::Stopped => break,
                Served::Lost(reason) => self.shared.link_down(Link::Writer, reason),
            }
            let until = Instant::now() + backoff.next();
            if !self.shared.wait_expiring(until).await {
                break;
            }
        }
        self.shared.fail_all();
        self.subscriptions
    }

    /// Keeps a written publication for [`RESEND_WINDOW`].
    fn remember(&mut self, entry: &Entry) {
        let now = Instant::now();
        while self
            .recent
            .front()
            .is_some_and(|(at, _, _)| now.duration_since(*at) > RESEND_WINDOW)
            || self.recent.len() >= RESEND_MAX
        {
            self.recent.pop_front();
        }
        self.recent.push_back((now, entry.op.clone(), entry.seq));
    }

    /// Puts the publications of the last [`RESEND_WINDOW`] back at the front of the outbox,
    /// in their order, with their sequence numbers (nobody waits for their answer).
    fn resend_recent(&mut self) {
        let now = Instant::now();
        let recent: Vec<(Instant, Op, u64)> = self.recent.drain(..).collect();
        let mut outbox = self.shared.outbox();
        let deadline = now + self.shared.config.buffer_age;
        let mut again = 0usize;
        for (at, op, seq) in recent.into_iter().rev() {
            if now.duration_since(at) > RESEND_WINDOW {
                continue;
            }
            let (answer, _) = oneshot::channel();
            outbox.messages += 1;
            outbox.queue.push_front(Entry {
                op,
                bytes: 0,
                seq,
                deadline,
                answer,
            });
            again += 1;
        }
        drop(outbox);
        if again > 0 {
            tracing::debug!(
                publications = again,
                "writing the latest publications again after Redis lost its data"
            );
        }
    }

    /// Waits `settle` after a Redis restart, refreshing the alive key as the outbox loop does.
    async fn settle(&mut self, conn: &mut MultiplexedConnection, settle: Duration) -> Settled {
        let refresh_every = self.shared.config.alive_ttl / 3;
        let until = Instant::now() + settle;
        loop {
            let now = Instant::now();
            if now >= until {
                return Settled::Done;
            }
            if !self
                .shared
                .wait_expiring(now + (until - now).min(refresh_every))
                .await
            {
                return Settled::Stopped;
            }
            if let Err(reason) = self.refresh_alive(conn).await {
                return Settled::Lost(reason);
            }
        }
    }

    /// Sets this node's alive key for another `alive_ttl`.
    async fn refresh_alive(&self, conn: &mut MultiplexedConnection) -> Result<(), String> {
        let refreshed: Result<(), RedisError> = redis::cmd("SET")
            .arg(&self.alive)
            .arg("1")
            .arg("PX")
            .arg(millis(self.shared.config.alive_ttl))
            .query_async(conn)
            .await;
        refreshed.map_err(|e| format!("refreshing the alive key: {e}"))
    }

    /// Sends the outbox and refreshes the alive key until the link fails or the endpoint
    /// stops.
    async fn serve(&mut self, conn: &mut MultiplexedConnection) -> Served {
        let refresh_every = self.shared.config.alive_ttl / 3;
        let mut next_refresh = Instant::now() + refresh_every;
        let mut next_check = Instant::now() + IDLE_CHECK;
        let shared = Arc::clone(&self.shared);
        loop {
            let notified = shared.work.notified();
            if self.shared.stopped() {
                return Served::Stopped;
            }
            if Instant::now() >= next_refresh {
                if let Err(reason) = self.refresh_alive(conn).await {
                    return Served::Lost(reason);
                }
                next_refresh = Instant::now() + refresh_every;
            }
            let trim = lock(&shared.trim_to).take();
            if let Some(position) = trim {
                let trimmed: Result<(), RedisError> = redis::cmd("XTRIM")
                    .arg(&self.inbox)
                    .arg("MINID")
                    .arg(&position)
                    .query_async(conn)
                    .await;
                if let Err(e) = trimmed {
                    lock(&shared.trim_to).get_or_insert(position);
                    return Served::Lost(format!("trimming the inbox: {e}"));
                }
            }
            self.shared.expire();
            let batch: Vec<Entry> = {
                let mut outbox = self.shared.outbox();
                let mut n = 0;
                let mut bytes = 0;
                for entry in outbox.queue.iter().take(MAX_BATCH) {
                    if n > 0 && bytes + entry.bytes > MAX_BATCH_BYTES {
                        break;
                    }
                    n += 1;
                    bytes += entry.bytes;
                }
                outbox.queue.drain(..n).collect()
            };
            if batch.is_empty() {
                if Instant::now() >= next_check {
                    let pong: Result<(), RedisError> = redis::cmd("PING").query_async(conn).await;
                    if let Err(e) = pong {
                        return Served::Lost(format!("checking the link: {e}"));
                    }
                    next_check = Instant::now() + IDLE_CHECK;
                }
                let seen = lock(&shared.restart_seen).take();
                if seen.is_some() && seen != self.epoch {
                    return Served::Lost("Redis restarted without its data".to_owned());
                }
                tokio::select! {
                    () = notified => {}
                    () = sleep_until(next_refresh.min(next_check)) => {}
                    () = self.shared.until_stopped() => return Served::Stopped,
                }
                continue;
            }
            if let Err(reason) = self.send(conn, batch).await {
                return Served::Lost(reason);
            }
            next_check = Instant::now() + IDLE_CHECK;
        }
    }

    /// Sends one batch in one pipeline and answers its entries.
    async fn send(
        &mut self,
        conn: &mut MultiplexedConnection,
        batch: Vec<Entry>,
    ) -> Result<(), String> {
        let shared = Arc::clone(&self.shared);
        let config = &shared.config;
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        for entry in &batch {
            match &entry.op {
                Op::Node { inbox, message } => {
                    pipe.cmd("EVALSHA")
                        .arg(shared.node_script.get_hash())
                        .arg(2)
                        .arg(inbox)
                        .arg(alive_key(inbox))
                        .arg(config.stream_max_len)
                        .arg(message.as_ref())
                        .arg(&shared.writer_token)
                        .arg(entry.seq);
                }
                Op::Channel { members, message } => {
                    pipe.cmd("EVALSHA")
                        .arg(shared.channel_script.get_hash())
                        .arg(1)
                        .arg(members)
                        .arg(config.stream_max_len)
                        .arg(message.as_ref())
                        .arg(&shared.writer_token)
                        .arg(entry.seq);
                }
                Op::Subscribe { members } => {
                    pipe.cmd("SADD").arg(members).arg(&self.inbox);
                }
                Op::Unsubscribe { members } => {
                    pipe.cmd("SREM").arg(members).arg(&self.inbox);
                }
            }
        }
        let results = match timeout(
            config.command_timeout,
            pipe.query_async::<Vec<redis::RedisResult<Value>>>(conn),
        )
        .await
        {
            Ok(Ok(results)) if results.len() == batch.len() => results,
            Ok(Ok(results)) => {
                let reason = format!(
                    "Redis answered {} replies to {} commands",
                    results.len(),
                    batch.len()
                );
                shared.requeue(batch);
                return Err(reason);
            }
            Ok(Err(e)) => {
                shared.requeue(batch);
                return Err(format!("sending: {e}"));
            }
            Err(_) => {
                shared.requeue(batch);
                return Err(format!(
                    "Redis did not answer within {:?}",
                    config.command_timeout
                ));
            }
        };
        let mut retry = Vec::new();
        for (entry, result) in batch.into_iter().zip(results) {
            if !retry.is_empty() {
                retry.push(entry);
                continue;
            }
            match result {
                Ok(value) => {
                    if matches!(entry.op, Op::Node { .. } | Op::Channel { .. }) {
                        self.remember(&entry);
                    }
                    let reach = match &entry.op {
                        Op::Node { .. } | Op::Channel { .. } => match value {
                            Value::Int(n) => Ok(Reach::nodes(u64::try_from(n).unwrap_or(0))),
                            other => Err(BackplaneError::Backend {
                                message: format!("unexpected reply to a publication: {other:?}"),
                                transient: false,
                                source: None,
                            }),
                        },
                        Op::Subscribe { members } => {
                            self.subscriptions.insert(members.clone());
                            Ok(Reach::UNKNOWN)
                        }
                        Op::Unsubscribe { members } => {
                            self.subscriptions.remove(members);
                            Ok(Reach::UNKNOWN)
                        }
                    };
                    shared.answer(entry, reach);
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        redis::ErrorKind::Server(redis::ServerErrorKind::NoScript)
                    ) =>
                {
                    retry.push(entry);
                }
                Err(e) => {
                    let transient = is_transient_reply(&e);
                    shared.answer(
                        entry,
                        Err(BackplaneError::Backend {
                            message: format!("Redis refused the command: {e}"),
                            transient,
                            source: Some(Box::new(e)),
                        }),
                    );
                }
            }
        }
        if !retry.is_empty() {
            // Someone flushed the scripts: load them again and send the rest once more.
            shared.requeue(retry);
            let loaded: Result<(), RedisError> = redis::pipe()
                .cmd("SCRIPT")
                .arg("LOAD")
                .arg(NODE_SCRIPT)
                .ignore()
                .cmd("SCRIPT")
                .arg("LOAD")
                .arg(CHANNEL_SCRIPT)
                .ignore()
                .query_async(conn)
                .await;
            if let Err(e) = loaded {
                return Err(format!("loading the scripts: {e}"));
            }
        }
        Ok(())
    }
}

enum Served {
    Stopped,
    Lost(String),
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis())
        .unwrap_or(u64::MAX)
        .max(1)
}

/// What the reader knows across reconnects.
struct Reader {
    shared: Arc<Shared>,
    inbox_key: String,
    inbox: Arc<dyn Inbox>,
    seen: Seen,
}

/// The highest writer sequence seen per writer token: a writer sends in sequence order and
/// resends a failed batch in the same order, so anything at or below it is a copy.
#[derive(Default)]
struct Seen {
    last: HashMap<String, u64>,
}

impl Seen {
    /// Whether entry `seq` of `writer` is new (and remembers it).
    fn first_time(&mut self, writer: &str, seq: u64) -> bool {
        match self.last.get_mut(writer) {
            Some(last) if seq <= *last => false,
            Some(last) => {
                *last = seq;
                true
            }
            None => {
                if self.last.len() >= MAX_WRITERS_REMEMBERED {
                    // Writers come and go with their endpoints; forgetting them all at once
                    // keeps this bounded, and only a copy in flight right now could slip by.
                    self.last.clear();
                }
                self.last.insert(writer.to_owned(), seq);
                true
            }
        }
    }
}

/// One `XREAD` reply: per stream, its entries as (id, fields and values).
type StreamReply = Option<Vec<(String, Vec<(String, Vec<Vec<u8>>)>)>>;

impl Reader {
    async fn run(mut self, mut first: watch::Receiver<Option<(String, String)>>) {
        let registered = tokio::select! {
            registered = first.wait_for(Option::is_some) => match registered {
                Ok(value) => value.clone(),
                Err(_) => None,
            },
            () = self.shared.until_stopped() => None,
        };
        let Some((mut position, mut epoch)) = registered else {
            return;
        };
        let mut backoff = Backoff::new();
        let response_timeout = READ_BLOCK + self.shared.config.command_timeout;
        loop {
            if self.shared.stopped() {
                return;
            }
            let connected = async {
                let mut conn = self
                    .shared
                    .connect(response_timeout)
                    .await
                    .map_err(|e| format!("connecting: {e}"))?;
                let now = self
                    .shared
                    .epoch(&mut conn)
                    .await
                    .map_err(|e| format!("reading the epoch: {e}"))?;
                Ok::<_, String>((conn, now))
            };
            let (mut conn, now) = tokio::select! {
                connected = connected => match connected {
                    Ok(connected) => connected,
                    Err(reason) => {
                        self.shared.link_down(Link::Reader, reason);
                        let until = Instant::now() + backoff.next();
                        if !self.shared.wait_expiring(until).await {
                            return;
                        }
                        continue;
                    }
                },
                () = self.shared.until_stopped() => return,
            };
            if now != epoch {
                // Redis lost its data: the inbox stream was recreated, and everything in it
                // is new to this node.
                position = "0-0".to_owned();
                epoch = now;
                *lock(&self.shared.restart_seen) = Some(epoch.clone());
                self.shared.work.notify_one();
            }
            backoff.reset();
            self.shared.link_up(Link::Reader);
            let reason = match self.read(&mut conn, &mut position).await {
                None => return,
                Some(reason) => reason,
            };
            self.shared.link_down(Link::Reader, reason);
            let until = Instant::now() + backoff.next();
            if !self.shared.wait_expiring(until).await {
                return;
            }
        }
    }

    /// Reads and hands over entries until the link fails (the reason) or the endpoint stops
    /// (`None`).
    async fn read(
        &mut self,
        conn: &mut MultiplexedConnection,
        position: &mut String,
    ) -> Option<String> {
        loop {
            let mut xread = redis::cmd("XREAD");
            xread
                .arg("COUNT")
                .arg(READ_COUNT)
                .arg("BLOCK")
                .arg(millis(READ_BLOCK))
                .arg("STREAMS")
                .arg(&self.inbox_key)
                .arg(position.as_str());
            let reply: Result<StreamReply, RedisError> = tokio::select! {
                reply = xread.query_async(conn) => reply,
                () = self.shared.until_stopped() => return None,
            };
            let streams = match reply {
                Ok(reply) => reply,
                Err(e) => return Some(format!("reading the inbox: {e}")),
            };
            let mut read_any = false;
            for (_, entries) in streams.unwrap_or_default() {
                for (id, fields) in entries {
                    if self.shared.stopped() {
                        return None;
                    }
                    *position = id;
                    read_any = true;
                    if let Some(message) = self.accept(&fields) {
                        self.inbox.receive(message).await;
                    }
                }
            }
            if read_any {
                // The writer trims, so this connection only ever reads (a Redis that pauses
                // writes does not stop this node from draining its inbox).
                *lock(&self.shared.trim_to) = Some(position.clone());
                self.shared.work.notify_one();
            }
        }
    }

    /// The message of one inbox entry, unless it is a duplicate or unreadable.
    fn accept(&mut self, fields: &[Vec<u8>]) -> Option<Message> {
        let mut message = None;
        let mut writer = None;
        let mut seq = None;
        for pair in fields.chunks_exact(2) {
            match pair[0].as_slice() {
                b"m" => message = Some(&pair[1]),
                b"w" => writer = std::str::from_utf8(&pair[1]).ok(),
                b"n" => {
                    seq = std::str::from_utf8(&pair[1])
                        .ok()
                        .and_then(|s| s.parse::<u64>().ok())
                }
                _ => {}
            }
        }
        let Some(bytes) = message else {
            tracing::warn!(inbox = %self.inbox_key, "an inbox entry without a message was skipped");
            return None;
        };
        if let (Some(writer), Some(seq)) = (writer, seq)
            && !self.seen.first_time(writer, seq)
        {
            return None;
        }
        match Message::decode(Bytes::copy_from_slice(bytes)) {
            Ok(message) => Some(message),
            Err(e) => {
                tracing::warn!(inbox = %self.inbox_key, error = %e, "a corrupt inbox entry was skipped");
                None
            }
        }
    }
}

impl fmt::Debug for RedisBackplane {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let node = match &*lock(&self.phase) {
            Phase::New => "not started".to_owned(),
            Phase::Running(running) => running.node.to_string(),
            Phase::Stopped => "stopped".to_owned(),
        };
        f.debug_struct("RedisBackplane")
            .field("node", &node)
            .field("prefix", &self.shared.config.channel_names.prefix())
            .finish_non_exhaustive()
    }
}

/// Counts endpoints in this process, so writer tokens differ even with a weak random source.
static ENDPOINTS: AtomicU64 = AtomicU64::new(0);

impl RedisBackplane {
    /// An endpoint for the Redis of `config.url`. Parses the URL; does no I/O.
    ///
    /// # Errors
    ///
    /// [`RedisBackplaneError::InvalidUrl`] when the URL does not parse (or asks for
    /// something this build cannot do), [`RedisBackplaneError::InvalidConfig`] when a bound
    /// is zero.
    pub fn new(config: RedisConfig) -> Result<Self, RedisBackplaneError> {
        if config.url.starts_with("rediss:") {
            // One crypto provider for TLS, whichever others the build links in; an
            // error means one is installed already.
            let _ = rustls::crypto::ring::default_provider().install_default();
        }
        let invalid = |e: RedisError| RedisBackplaneError::InvalidUrl {
            reason: e.to_string(),
        };
        let client = match &config.tls_root_certificate {
            None => Client::open(config.url.as_str()).map_err(invalid)?,
            Some(_) if !config.url.starts_with("rediss:") => {
                return Err(RedisBackplaneError::InvalidUrl {
                    reason: "a TLS root certificate needs a rediss:// URL".to_owned(),
                });
            }
            Some(pem) => Client::build_with_tls(
                config.url.as_str(),
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(pem.clone()),
                },
            )
            .map_err(invalid)?,
        };
        for (name, zero) in [
            ("buffer_messages", config.buffer_messages == 0),
            ("buffer_bytes", config.buffer_bytes == 0),
            ("buffer_age", config.buffer_age.is_zero()),
            ("command_timeout", config.command_timeout.is_zero()),
            ("stream_max_len", config.stream_max_len == 0),
            ("alive_ttl", config.alive_ttl < Duration::from_millis(3)),
        ] {
            if zero {
                return Err(RedisBackplaneError::InvalidConfig { setting: name });
            }
        }
        let writer_token = format!(
            "{:016x}{:04x}",
            rand::random::<u64>(),
            ENDPOINTS.fetch_add(1, AtomicOrdering::Relaxed) & 0xffff
        );
        Ok(Self {
            shared: Arc::new(Shared {
                config,
                client,
                outbox: Mutex::new(Outbox::default()),
                work: Notify::new(),
                trim_to: Mutex::new(None),
                links: Mutex::new(Links {
                    writer: Some("not connected yet".to_owned()),
                    reader: Some("not connected yet".to_owned()),
                    outage: false,
                }),
                restart_seen: Mutex::new(None),
                stopping: AtomicBool::new(false),
                stop: watch::channel(false).0,
                writer_token,
                node_script: Script::new(NODE_SCRIPT),
                channel_script: Script::new(CHANNEL_SCRIPT),
            }),
            phase: Mutex::new(Phase::New),
        })
    }

    /// The configuration this endpoint runs with.
    pub fn config(&self) -> &RedisConfig {
        &self.shared.config
    }

    fn running(&self, operation: &str) -> Result<(), BackplaneError> {
        match &*lock(&self.phase) {
            Phase::Running(_) if !self.shared.stopped() => Ok(()),
            _ => Err(stopped_error(operation)),
        }
    }

    /// Queues `op` for the writer and waits for its answer.
    async fn submit(&self, op: Op, bytes: usize) -> Result<Reach, BackplaneError> {
        let config = &self.shared.config;
        let (answer, answered) = oneshot::channel();
        {
            let mut outbox = self.shared.outbox();
            if outbox.messages >= config.buffer_messages {
                return Err(BackplaneError::Backlogged {
                    message: format!("{} entries wait in the outbox", outbox.messages),
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
        // The writer answers within the buffer age plus one command; the extra second only
        // guards against a writer that is gone.
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
                "redis",
                "subscribing to a node address",
            ));
        }
        self.running(if subscribe {
            "subscribe"
        } else {
            "unsubscribe"
        })?;
        let members = members_key(&self.shared.config.channel_names, address);
        let bytes = members.len();
        let op = if subscribe {
            Op::Subscribe { members }
        } else {
            Op::Unsubscribe { members }
        };
        self.submit(op, bytes).await.map(|_| ())
    }

    /// Takes the endpoint out of service; the tasks to wait for, if it was running.
    fn leave(&self) -> Option<Running> {
        let previous = std::mem::replace(&mut *lock(&self.phase), Phase::Stopped);
        self.shared.stopping.store(true, AtomicOrdering::SeqCst);
        self.shared.stop.send_replace(true);
        match previous {
            Phase::Running(running) => Some(running),
            Phase::New | Phase::Stopped => None,
        }
    }

    /// Removes this node from Redis: its alive key, its inbox and its memberships. Best
    /// effort, bounded by one command timeout.
    async fn deregister(&self, node: &NodeId, members: Vec<String>) {
        let config = &self.shared.config;
        let inbox = config.channel_names.channel(&Address::Node(node.clone()));
        let work = async {
            let mut conn = self.shared.connect(config.command_timeout).await?;
            let mut pipe = redis::pipe();
            pipe.cmd("DEL").arg(alive_key(&inbox)).ignore();
            for members in &members {
                pipe.cmd("SREM").arg(members).arg(&inbox).ignore();
            }
            pipe.cmd("DEL").arg(&inbox).ignore();
            pipe.query_async::<()>(&mut conn).await
        };
        match timeout(config.command_timeout, work).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::debug!(error = %e, "could not deregister from Redis at stop"),
            Err(_) => tracing::debug!("deregistering from Redis at stop timed out"),
        }
    }
}

impl Drop for RedisBackplane {
    fn drop(&mut self) {
        if let Some(running) = self.leave() {
            running.writer.abort();
            running.reader.abort();
        }
    }
}

#[async_trait]
impl Backplane for RedisBackplane {
    fn capabilities(&self) -> BackplaneCapabilities {
        BackplaneCapabilities {
            name: "redis",
            delivery: DeliveryClass::Resumable,
            ordering: Ordering::PerSender,
            max_payload: self.shared.config.max_payload,
            node_addressed: true,
            channels: true,
            reach: true,
        }
    }

    /// Starts the writer and reader tasks and waits for the first connection attempt.
    ///
    /// When Redis answers, the node is registered before this returns. When Redis cannot
    /// be reached, this still succeeds: the tasks keep connecting in the background and
    /// [`health`](Backplane::health) stays down until they do. When Redis refuses the
    /// credentials, this fails with a permanent [`BackplaneError::Backend`].
    async fn start(&self, node: &NodeId, inbox: Arc<dyn Inbox>) -> Result<(), BackplaneError> {
        let (started_tx, started_rx) = oneshot::channel();
        {
            let mut phase = lock(&self.phase);
            if !matches!(*phase, Phase::New) {
                return Err(BackplaneError::Backend {
                    message: format!(
                        "this Redis backplane was already started; cannot start it as {node}"
                    ),
                    transient: false,
                    source: None,
                });
            }
            let inbox_key = self
                .shared
                .config
                .channel_names
                .channel(&Address::Node(node.clone()));
            let (first_tx, first_rx) = watch::channel(None);
            let writer = Writer {
                shared: Arc::clone(&self.shared),
                alive: alive_key(&inbox_key),
                inbox: inbox_key.clone(),
                subscriptions: BTreeSet::new(),
                epoch: None,
                recent: VecDeque::new(),
            };
            let reader = Reader {
                shared: Arc::clone(&self.shared),
                inbox_key,
                inbox,
                seen: Seen::default(),
            };
            *phase = Phase::Running(Running {
                node: node.clone(),
                writer: tokio::spawn(writer.run(started_tx, first_tx)),
                reader: tokio::spawn(reader.run(first_rx)),
            });
        }
        let bound = self.shared.config.command_timeout * 3;
        match timeout(bound, started_rx).await {
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(Ok(Err(error))) if error.fatal => {
                if let Some(running) = self.leave() {
                    running.reader.abort();
                    running.writer.abort();
                }
                Err(error.into_backplane_error())
            }
            Ok(Ok(Err(error))) => {
                tracing::debug!(error = %error.message, "Redis is not reachable yet; connecting in the background");
                Ok(())
            }
            Ok(Err(_)) | Err(_) => Ok(()),
        }
    }

    async fn publish(&self, message: &Message) -> Result<Reach, BackplaneError> {
        self.running("publish")?;
        let max = self.shared.config.max_payload;
        if message.payload.len() > max {
            return Err(BackplaneError::TooLarge {
                size: message.payload.len(),
                max,
            });
        }
        let names = &self.shared.config.channel_names;
        let encoded = message.encode();
        let bytes = encoded.len();
        let op = match &message.to {
            Address::Node(_) => Op::Node {
                inbox: names.channel(&message.to),
                message: encoded,
            },
            channel => Op::Channel {
                members: members_key(names, channel),
                message: encoded,
            },
        };
        self.submit(op, bytes).await
    }

    async fn subscribe(&self, address: &Address) -> Result<(), BackplaneError> {
        self.subscription(address, true).await
    }

    async fn unsubscribe(&self, address: &Address) -> Result<(), BackplaneError> {
        self.subscription(address, false).await
    }

    fn health(&self) -> Health {
        match &*lock(&self.phase) {
            Phase::New => return Health::Down("not started".to_owned()),
            Phase::Stopped => return Health::Down("stopped".to_owned()),
            Phase::Running(_) => {}
        }
        let links = lock(&self.shared.links);
        match (&links.writer, &links.reader) {
            (None, None) => Health::Up,
            (Some(w), None) => Health::Down(format!("Redis writer link: {w}")),
            (None, Some(r)) => Health::Down(format!("Redis reader link: {r}")),
            (Some(w), Some(r)) => Health::Down(format!("Redis writer link: {w}; reader link: {r}")),
        }
    }

    async fn stop(&self) {
        let Some(running) = self.leave() else {
            return;
        };
        let current = tokio::task::try_id();
        // The writer answers what is left in the outbox and hands back the memberships.
        let members = if current == Some(running.writer.id()) {
            Vec::new()
        } else {
            running
                .writer
                .await
                .map(|held| held.into_iter().collect())
                .unwrap_or_default()
        };
        if current != Some(running.reader.id()) {
            let _ = running.reader.await;
        }
        self.deregister(&running.node, members).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_from_a_resent_batch_are_dropped() {
        let mut seen = Seen::default();
        assert!(seen.first_time("w1", 1));
        assert!(seen.first_time("w1", 2));
        assert!(seen.first_time("w2", 1), "writers are told apart");
        assert!(!seen.first_time("w1", 1));
        assert!(!seen.first_time("w1", 2));
        assert!(seen.first_time("w1", 5), "gaps are entries for other nodes");
        assert!(!seen.first_time("w1", 3));
        for w in 0..MAX_WRITERS_REMEMBERED + 1 {
            assert!(seen.first_time(&format!("x{w}"), 1));
        }
        assert!(seen.last.len() <= MAX_WRITERS_REMEMBERED);
    }

    #[test]
    fn backoff_doubles_up_to_the_cap_with_jitter() {
        let mut backoff = Backoff::new();
        let mut step = RECONNECT_MIN_DELAY;
        for _ in 0..20 {
            let delay = backoff.next();
            assert!(
                delay >= step / 2 && delay <= step,
                "{delay:?} for a step of {step:?}"
            );
            step = (step * 2).min(RECONNECT_MAX_DELAY);
        }
        assert!(backoff.next() <= RECONNECT_MAX_DELAY);
        backoff.reset();
        assert!(backoff.next() <= RECONNECT_MIN_DELAY);
    }

    #[test]
    fn urls_and_bounds_are_checked_without_io() {
        for url in [
            "redis://127.0.0.1:1/",
            "redis://user:pass@localhost:6380/2",
            "rediss://example.invalid:6380/",
        ] {
            assert!(RedisBackplane::new(RedisConfig::new(url)).is_ok(), "{url}");
        }
        for url in ["http://localhost/", "not a url", ""] {
            let err = RedisBackplane::new(RedisConfig::new(url)).expect_err(url);
            assert!(
                matches!(err, RedisBackplaneError::InvalidUrl { .. }),
                "{url}: {err}"
            );
        }
        let zero = RedisConfig::new("redis://127.0.0.1/").with_buffer_messages(0);
        assert_eq!(
            RedisBackplane::new(zero)
                .expect_err("zero bound")
                .to_string(),
            "the Redis backplane setting `buffer_messages` must be positive"
        );
    }

    #[test]
    fn key_names_come_from_channel_names() {
        let names = ChannelNames::new("p").expect("valid");
        let inbox = names.channel(&Address::Node(NodeId::new("n1").expect("valid")));
        assert_eq!(inbox, "p:node:n1");
        assert_eq!(alive_key(&inbox), "p:node:n1:alive");
        assert_eq!(members_key(&names, &Address::All), "p:all:members");
        assert_eq!(
            members_key(&names, &Address::Group(Arc::from("a:b"))),
            "p:group:a%3Ab:members"
        );
        assert_eq!(epoch_key(&names), "p:epoch");
    }

    #[test]
    fn credential_errors_are_told_apart() {
        let wrong = RedisError::from((
            redis::ErrorKind::AuthenticationFailed,
            "invalid username-password pair",
        ));
        assert!(is_auth_error(&wrong));
        let io = RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert!(!is_auth_error(&io));
        assert!(is_transient_reply(&io));
    }

    #[tokio::test]
    async fn calls_before_start_and_after_stop_are_refused() {
        let plane = RedisBackplane::new(RedisConfig::new("redis://127.0.0.1:1/")).expect("valid");
        assert_eq!(plane.health(), Health::Down("not started".to_owned()));
        let message = Message::new(
            switchboard_core::MessageId {
                origin: NodeId::new("n").expect("valid"),
                seq: 1,
            },
            Address::All,
            Vec::new(),
            Bytes::new(),
        );
        let err = plane.publish(&message).await.expect_err("not started");
        assert!(!err.is_transient());
        plane.stop().await;
        assert_eq!(plane.health(), Health::Down("stopped".to_owned()));
        assert!(plane.subscribe(&Address::All).await.is_err());
    }
}
