//! The stores and backplanes compiled into this build, chosen at run time by name (`--store`,
//! `--backplane`).
//!
//! Each store beyond `memory` comes with a Cargo feature of the server (`groups`, `sql`,
//! `azure`; `all-stores` builds every one). A kind whose backend is not compiled in answers
//! [`OpenError::NotCompiled`], naming what the build has.

use std::fmt;
use std::sync::Arc;

use switchboard_core::{Backplane, Capabilities, ConnectionStore};
use switchboard_memory::MemoryStore;

/// The four user-mapping strategies, by their `--store` name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum StoreKind {
    /// In-memory map of user → connections (one node).
    Memory,
    /// One group per user, membership managed by the hub framework.
    Groups,
    /// A SQL table of users and connections (PostgreSQL or SQLite).
    Sql,
    /// Azure Table Storage: partition = user, row = connection id.
    Azure,
}

impl fmt::Display for StoreKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Memory => "memory",
            Self::Groups => "groups",
            Self::Sql => "sql",
            Self::Azure => "azure",
        })
    }
}

/// The backplanes, by their `--backplane` name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
#[non_exhaustive]
pub enum BackplaneKind {
    /// No backplane: one node, or a shared store whose other nodes cannot be reached.
    None,
    /// Redis: per-node streams and membership sets (the `redis` feature).
    Redis,
}

impl fmt::Display for BackplaneKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::None => "none",
            Self::Redis => "redis",
        })
    }
}

/// What a backplane is opened with (the `--backplane-*` and `--redis-*` flags).
#[derive(Debug, Clone)]
pub struct BackplaneSettings {
    /// The Redis URL (`redis://`, `redis://user:password@host:port/db`, `rediss://`).
    pub redis_url: Option<String>,
    /// Prefix of every channel and key.
    pub prefix: String,
    /// Largest message payload, bytes.
    pub max_payload: usize,
    /// Messages that may wait for the broker at once.
    pub buffer_messages: usize,
    /// Bytes that may wait for the broker at once.
    pub buffer_bytes: usize,
    /// How long a message may wait for the broker.
    pub buffer_age: std::time::Duration,
    /// How long a node that stopped renewing its presence still counts as running.
    pub presence_ttl: std::time::Duration,
}

/// Opens the backplane `kind`; `None` for [`BackplaneKind::None`].
///
/// # Errors
///
/// [`OpenError`] when the backplane is not compiled in or its settings are invalid.
pub async fn open_backplane(
    kind: BackplaneKind,
    settings: &BackplaneSettings,
) -> Result<Option<Arc<dyn Backplane>>, OpenError> {
    let _ = settings;
    match kind {
        BackplaneKind::None => Ok(None),
        #[cfg(feature = "redis")]
        BackplaneKind::Redis => redis::open(settings).map(Some),
        #[cfg(not(feature = "redis"))]
        BackplaneKind::Redis => Err(OpenError::BackplaneNotCompiled { requested: kind }),
    }
}

#[cfg(feature = "redis")]
mod redis {
    use std::sync::Arc;

    use switchboard_core::{Backplane, ChannelNames};
    use switchboard_redis::{RedisBackplane, RedisConfig};

    use super::{BackplaneSettings, OpenError};

    pub(super) fn open(settings: &BackplaneSettings) -> Result<Arc<dyn Backplane>, OpenError> {
        let url = settings
            .redis_url
            .clone()
            .ok_or_else(|| OpenError::Invalid("--backplane redis needs --redis-url".to_owned()))?;
        let names =
            ChannelNames::new(&settings.prefix).map_err(|e| OpenError::Invalid(e.to_string()))?;
        let config = RedisConfig::new(url)
            .with_channel_names(names)
            .with_max_payload(settings.max_payload)
            .with_buffer_messages(settings.buffer_messages)
            .with_buffer_bytes(settings.buffer_bytes)
            .with_buffer_age(settings.buffer_age)
            .with_alive_ttl(settings.presence_ttl);
        let backplane =
            RedisBackplane::new(config).map_err(|e| OpenError::Invalid(e.to_string()))?;
        Ok(Arc::new(backplane))
    }
}

/// Why a store could not be opened.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    /// The store's backend is not compiled into this binary.
    #[error(
        "the `{requested}` store is not compiled into this binary; this build includes: {available}"
    )]
    NotCompiled {
        /// The requested store.
        requested: StoreKind,
        /// Names of the stores this build has.
        available: String,
    },
    /// The backplane is not compiled into this binary.
    #[error(
        "the `{requested}` backplane is not compiled into this binary (build with `--features {requested}`)"
    )]
    BackplaneNotCompiled {
        /// The requested backplane.
        requested: BackplaneKind,
    },
    /// The settings do not make a usable store or backplane.
    #[error("{0}")]
    Invalid(String),
}

/// Capabilities of every store compiled into this build, in `--store` order.
pub fn compiled() -> Vec<Capabilities> {
    let mut stores = vec![MemoryStore::CAPABILITIES];
    #[cfg(feature = "groups")]
    stores.push(switchboard_groups::GroupStore::CAPABILITIES);
    stores
}

/// The strategies that can serve users from several nodes (given a backplane), by name: the
/// ones compiled in, and those of this release that a build with more features has.
pub fn spanning_strategies() -> String {
    let mut names: Vec<&str> = compiled()
        .iter()
        .filter(|c| c.spans_nodes())
        .map(|c| c.strategy)
        .collect();
    for planned in ["groups", "sql", "azure"] {
        if !names.contains(&planned) {
            names.push(planned);
        }
    }
    names.join(", ")
}

/// Opens the store `kind`.
///
/// # Errors
///
/// [`OpenError::NotCompiled`] when this build lacks that store.
pub async fn open(kind: StoreKind) -> Result<Arc<dyn ConnectionStore>, OpenError> {
    match kind {
        StoreKind::Memory => Ok(Arc::new(MemoryStore::new())),
        #[cfg(feature = "groups")]
        StoreKind::Groups => Ok(Arc::new(switchboard_groups::GroupStore::new())),
        other => Err(OpenError::NotCompiled {
            requested: other,
            available: compiled()
                .iter()
                .map(|c| c.strategy)
                .collect::<Vec<_>>()
                .join(", "),
        }),
    }
}
