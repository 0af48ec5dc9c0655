//! [`RedisConfig`]: where the broker is and the bounds the backplane keeps.

use std::time::Duration;

use switchboard_core::ChannelNames;

/// How a [`RedisBackplane`](crate::RedisBackplane) connects and what it bounds.
///
/// Build it with [`RedisConfig::new`] and the `with_*` setters; every bound has a documented
/// `DEFAULT_*` constant.
#[derive(Debug, Clone)]
pub struct RedisConfig {
    /// `redis://[user:password@]host[:port][/db]` or `rediss://…` (TLS).
    pub url: String,
    /// Builds every key name; its prefix separates deployments sharing one Redis.
    pub channel_names: ChannelNames,
    /// Largest payload accepted, in bytes.
    pub max_payload: usize,
    /// Most publications and subscription changes waiting in the outbox.
    pub buffer_messages: usize,
    /// Most encoded bytes waiting in the outbox.
    pub buffer_bytes: usize,
    /// Longest a publication waits in the outbox before it fails.
    pub buffer_age: Duration,
    /// How long a command may take before the link counts as down.
    pub command_timeout: Duration,
    /// Approximate bound on the entries kept in one node's inbox stream (`MAXLEN ~`).
    pub stream_max_len: u64,
    /// Lifetime of a node's alive key; the backplane refreshes it every third of it.
    pub alive_ttl: Duration,
    /// For `rediss://` URLs: the PEM certificate(s) to trust instead of the system's roots
    /// (a private CA). `None` (the default) trusts the system's roots.
    pub tls_root_certificate: Option<Vec<u8>>,
}

impl RedisConfig {
    /// Default [`max_payload`](Self::max_payload): 1 MiB, as the in-memory bus.
    pub const DEFAULT_MAX_PAYLOAD: usize = 1024 * 1024;
    /// Default [`buffer_messages`](Self::buffer_messages).
    pub const DEFAULT_BUFFER_MESSAGES: usize = 10_000;
    /// Default [`buffer_bytes`](Self::buffer_bytes): 16 MiB.
    pub const DEFAULT_BUFFER_BYTES: usize = 16 * 1024 * 1024;
    /// Default [`buffer_age`](Self::buffer_age).
    pub const DEFAULT_BUFFER_AGE: Duration = Duration::from_secs(10);
    /// Default [`command_timeout`](Self::command_timeout).
    pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(2);
    /// Default [`stream_max_len`](Self::stream_max_len).
    pub const DEFAULT_STREAM_MAX_LEN: u64 = 100_000;
    /// Default [`alive_ttl`](Self::alive_ttl).
    pub const DEFAULT_ALIVE_TTL: Duration = Duration::from_secs(15);

    /// A configuration for the Redis at `url`, with the default prefix and bounds.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            channel_names: ChannelNames::default(),
            max_payload: Self::DEFAULT_MAX_PAYLOAD,
            buffer_messages: Self::DEFAULT_BUFFER_MESSAGES,
            buffer_bytes: Self::DEFAULT_BUFFER_BYTES,
            buffer_age: Self::DEFAULT_BUFFER_AGE,
            command_timeout: Self::DEFAULT_COMMAND_TIMEOUT,
            stream_max_len: Self::DEFAULT_STREAM_MAX_LEN,
            alive_ttl: Self::DEFAULT_ALIVE_TTL,
            tls_root_certificate: None,
        }
    }

    /// Sets [`channel_names`](Self::channel_names).
    pub fn with_channel_names(mut self, channel_names: ChannelNames) -> Self {
        self.channel_names = channel_names;
        self
    }

    /// Sets [`max_payload`](Self::max_payload).
    pub fn with_max_payload(mut self, max_payload: usize) -> Self {
        self.max_payload = max_payload;
        self
    }

    /// Sets [`buffer_messages`](Self::buffer_messages).
    pub fn with_buffer_messages(mut self, buffer_messages: usize) -> Self {
        self.buffer_messages = buffer_messages;
        self
    }

    /// Sets [`buffer_bytes`](Self::buffer_bytes).
    pub fn with_buffer_bytes(mut self, buffer_bytes: usize) -> Self {
        self.buffer_bytes = buffer_bytes;
        self
    }

    /// Sets [`buffer_age`](Self::buffer_age).
    pub fn with_buffer_age(mut self, buffer_age: Duration) -> Self {
        self.buffer_age = buffer_age;
        self
    }

    /// Sets [`command_timeout`](Self::command_timeout).
    pub fn with_command_timeout(mut self, command_timeout: Duration) -> Self {
        self.command_timeout = command_timeout;
        self
    }

    /// Sets [`stream_max_len`](Self::stream_max_len).
    pub fn with_stream_max_len(mut self, stream_max_len: u64) -> Self {
        self.stream_max_len = stream_max_len;
        self
    }

    /// Sets [`alive_ttl`](Self::alive_ttl).
    pub fn with_alive_ttl(mut self, alive_ttl: Duration) -> Self {
        self.alive_ttl = alive_ttl;
        self
    }

    /// Sets [`tls_root_certificate`](Self::tls_root_certificate).
    pub fn with_tls_root_certificate(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.tls_root_certificate = Some(pem.into());
        self
    }
}
