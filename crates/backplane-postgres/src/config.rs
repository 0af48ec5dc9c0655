//! [`PostgresConfig`]: where the database is, which schema holds the tables, and the bounds
//! the backplane keeps.

use std::time::Duration;

use switchboard_core::ChannelNames;

/// How a [`PostgresBackplane`](crate::PostgresBackplane) connects and what it bounds.
///
/// Build it with [`PostgresConfig::new`] and the `with_*` setters; every bound has a
/// documented `DEFAULT_*` constant. Nothing is checked or opened until
/// [`PostgresBackplane::new`](crate::PostgresBackplane::new) (checks) and `start` (connects).
#[derive(Debug, Clone)]
pub struct PostgresConfig {
    pub(crate) url: String,
    pub(crate) schema: String,
    pub(crate) channel_names: ChannelNames,
    pub(crate) max_payload: usize,
    pub(crate) buffer_messages: usize,
    pub(crate) buffer_bytes: usize,
    pub(crate) buffer_age: Duration,
    pub(crate) poll_interval: Duration,
    pub(crate) retention: Duration,
    pub(crate) presence_ttl: Duration,
    pub(crate) command_timeout: Duration,
}

impl PostgresConfig {
    /// Default schema holding the backplane's tables.
    pub const DEFAULT_SCHEMA: &'static str = "switchboard_backplane";
    /// Default largest payload: 1 MiB, as the Redis backplane and the in-memory bus.
    pub const DEFAULT_MAX_PAYLOAD: usize = 1024 * 1024;
    /// Default most publications and subscription changes waiting in the outbox.
    pub const DEFAULT_BUFFER_MESSAGES: usize = 10_000;
    /// Default most encoded bytes waiting in the outbox: 16 MiB.
    pub const DEFAULT_BUFFER_BYTES: usize = 16 * 1024 * 1024;
    /// Default longest a publication waits in the outbox before it fails.
    pub const DEFAULT_BUFFER_AGE: Duration = Duration::from_secs(10);
    /// Default interval of the fallback poll of this node's inbox rows.
    pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(1);
    /// Default age after which undelivered inbox rows are deleted.
    pub const DEFAULT_RETENTION: Duration = Duration::from_secs(60);
    /// Default lifetime of a node's presence row; it is renewed every third of it.
    pub const DEFAULT_PRESENCE_TTL: Duration = Duration::from_secs(15);
    /// Default bound on one database round (connect, statement or transaction).
    pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(2);

    /// A configuration for the database at `url`
    /// (`postgres://user[:password]@host[:port]/database`), with the default schema,
    /// channel prefix and bounds.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            schema: Self::DEFAULT_SCHEMA.to_owned(),
            channel_names: ChannelNames::default(),
            max_payload: Self::DEFAULT_MAX_PAYLOAD,
            buffer_messages: Self::DEFAULT_BUFFER_MESSAGES,
            buffer_bytes: Self::DEFAULT_BUFFER_BYTES,
            buffer_age: Self::DEFAULT_BUFFER_AGE,
            poll_interval: Self::DEFAULT_POLL_INTERVAL,
            retention: Self::DEFAULT_RETENTION,
            presence_ttl: Self::DEFAULT_PRESENCE_TTL,
            command_timeout: Self::DEFAULT_COMMAND_TIMEOUT,
        }
    }

    /// Sets the schema holding the tables (1 to 63 characters from `a-z 0-9 _`, starting with
    /// a letter or `_`); it is created if missing. Deployments sharing a database use
    /// different schemas.
    pub fn with_schema(mut self, schema: impl Into<String>) -> Self {
        self.schema = schema.into();
        self
    }

    /// Sets the channel names; their prefix is part of every subscription row and of the
    /// NOTIFY channel names.
    pub fn with_channel_names(mut self, names: ChannelNames) -> Self {
        self.channel_names = names;
        self
    }

    /// Sets the largest payload accepted, in bytes.
    pub fn with_max_payload(mut self, bytes: usize) -> Self {
        self.max_payload = bytes;
        self
    }

    /// Sets the most entries waiting in the outbox.
    pub fn with_buffer_messages(mut self, n: usize) -> Self {
        self.buffer_messages = n;
        self
    }

    /// Sets the most encoded bytes waiting in the outbox.
    pub fn with_buffer_bytes(mut self, n: usize) -> Self {
        self.buffer_bytes = n;
        self
    }

    /// Sets how long an entry may wait in the outbox before it fails.
    pub fn with_buffer_age(mut self, d: Duration) -> Self {
        self.buffer_age = d;
        self
    }

    /// Sets the interval of the fallback poll (covers lost notifications).
    pub fn with_poll_interval(mut self, d: Duration) -> Self {
        self.poll_interval = d;
        self
    }

    /// Sets how long undelivered rows are kept.
    pub fn with_retention(mut self, d: Duration) -> Self {
        self.retention = d;
        self
    }

    /// Sets the lifetime of this node's presence row.
    pub fn with_presence_ttl(mut self, d: Duration) -> Self {
        self.presence_ttl = d;
        self
    }

    /// Sets the bound on one database round.
    pub fn with_command_timeout(mut self, d: Duration) -> Self {
        self.command_timeout = d;
        self
    }

    /// The database URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The schema holding the tables.
    pub fn schema(&self) -> &str {
        &self.schema
    }

    /// The channel names.
    pub fn channel_names(&self) -> &ChannelNames {
        &self.channel_names
    }

    /// The largest payload accepted.
    pub fn max_payload(&self) -> usize {
        self.max_payload
    }
}
