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
    /// PostgreSQL: a message table per node, woken by LISTEN/NOTIFY (the `postgres`
    /// feature), so a `sql` deployment needs nothing but PostgreSQL.
    Postgres,
}

impl fmt::Display for BackplaneKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::None => "none",
            Self::Redis => "redis",
            Self::Postgres => "postgres",
        })
    }
}

/// What a store is opened with (the `--database-*` and `--azure-*` flags). Its `Debug` form
/// leaves out the database URL and the connection string, which may hold secrets.
#[derive(Clone)]
pub struct StoreSettings {
    /// The database of the `sql` store: `sqlite://path` (created if missing),
    /// `sqlite::memory:` or `postgres://user:password@host:port/database`.
    pub database_url: Option<String>,
    /// The PostgreSQL schema the `sql` store keeps its tables in (created if missing).
    pub database_schema: String,
    /// Most database connections the store's pool opens.
    pub database_pool_size: u32,
    /// How long an operation waits for a free database connection (or a new one) before it
    /// fails as unavailable: how fast a database that went away is noticed.
    pub database_acquire_timeout: std::time::Duration,
    /// The storage account of the `azure` store: its connection string
    /// (`DefaultEndpointsProtocol=…;AccountName=…;AccountKey=…` with `EndpointSuffix=…` or
    /// `TableEndpoint=…`), or `UseDevelopmentStorage=true` for Azurite on its default port.
    /// Holds the account key.
    pub azure_connection_string: Option<String>,
    /// The table the `azure` store keeps its records in (created if missing).
    pub azure_table: String,
    /// How long one request of the `azure` store may take before it counts as failed.
    pub azure_request_timeout: std::time::Duration,
    /// How long an operation of the `azure` store retries transient failures.
    pub azure_retry_budget: std::time::Duration,
    /// How many requests the `azure` store sends at the same time.
    pub azure_max_in_flight: usize,
}

impl Default for StoreSettings {
    fn default() -> Self {
        Self {
            database_url: None,
            database_schema: DEFAULT_DATABASE_SCHEMA.to_owned(),
            database_pool_size: DEFAULT_DATABASE_POOL_SIZE,
            database_acquire_timeout: DEFAULT_DATABASE_ACQUIRE_TIMEOUT,
            azure_connection_string: None,
            azure_table: DEFAULT_AZURE_TABLE.to_owned(),
            azure_request_timeout: DEFAULT_AZURE_REQUEST_TIMEOUT,
            azure_retry_budget: DEFAULT_AZURE_RETRY_BUDGET,
            azure_max_in_flight: DEFAULT_AZURE_MAX_IN_FLIGHT as usize,
        }
    }
}

impl fmt::Debug for StoreSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let redacted = |set: bool| if set { "Some(<redacted>)" } else { "None" };
        f.debug_struct("StoreSettings")
            .field(
                "database_url",
                &format_args!("{}", redacted(self.database_url.is_some())),
            )
            .field("database_schema", &self.database_schema)
            .field("database_pool_size", &self.database_pool_size)
            .field("database_acquire_timeout", &self.database_acquire_timeout)
            .field(
                "azure_connection_string",
                &format_args!("{}", redacted(self.azure_connection_string.is_some())),
            )
            .field("azure_table", &self.azure_table)
            .field("azure_request_timeout", &self.azure_request_timeout)
            .field("azure_retry_budget", &self.azure_retry_budget)
            .field("azure_max_in_flight", &self.azure_max_in_flight)
            .finish()
    }
}

/// The default of [`StoreSettings::database_schema`].
pub const DEFAULT_DATABASE_SCHEMA: &str = "public";
/// The default of [`StoreSettings::database_pool_size`].
pub const DEFAULT_DATABASE_POOL_SIZE: u32 = 16;
/// The default of [`StoreSettings::database_acquire_timeout`].
pub const DEFAULT_DATABASE_ACQUIRE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);
/// The default of [`StoreSettings::azure_table`].
#[cfg(feature = "azure")]
pub const DEFAULT_AZURE_TABLE: &str = switchboard_azure::DEFAULT_TABLE;
/// The default of [`StoreSettings::azure_table`].
#[cfg(not(feature = "azure"))]
pub const DEFAULT_AZURE_TABLE: &str = "connection";
/// The default of [`StoreSettings::azure_request_timeout`].
#[cfg(feature = "azure")]
pub const DEFAULT_AZURE_REQUEST_TIMEOUT: std::time::Duration =
    switchboard_azure::DEFAULT_REQUEST_TIMEOUT;
/// The default of [`StoreSettings::azure_request_timeout`].
#[cfg(not(feature = "azure"))]
pub const DEFAULT_AZURE_REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);
/// The default of [`StoreSettings::azure_retry_budget`].
#[cfg(feature = "azure")]
pub const DEFAULT_AZURE_RETRY_BUDGET: std::time::Duration = switchboard_azure::DEFAULT_RETRY_BUDGET;
/// The default of [`StoreSettings::azure_retry_budget`].
#[cfg(not(feature = "azure"))]
pub const DEFAULT_AZURE_RETRY_BUDGET: std::time::Duration = std::time::Duration::from_secs(4);
/// The default of [`StoreSettings::azure_max_in_flight`].
#[cfg(feature = "azure")]
pub const DEFAULT_AZURE_MAX_IN_FLIGHT: u32 = switchboard_azure::DEFAULT_MAX_IN_FLIGHT as u32;
/// The default of [`StoreSettings::azure_max_in_flight`].
#[cfg(not(feature = "azure"))]
pub const DEFAULT_AZURE_MAX_IN_FLIGHT: u32 = 64;

/// What a backplane is opened with (the `--backplane-*` and `--redis-*` flags).
#[derive(Debug, Clone)]
pub struct BackplaneSettings {
    /// The Redis URL (`redis://`, `redis://user:password@host:port/db`, `rediss://`).
    pub redis_url: Option<String>,
    /// The PostgreSQL URL of `--backplane postgres` (the `--database-url`).
    pub postgres_url: Option<String>,
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
        #[cfg(feature = "postgres")]
        BackplaneKind::Postgres => postgres::open(settings).map(Some),
        #[cfg(not(feature = "postgres"))]
        BackplaneKind::Postgres => Err(OpenError::BackplaneNotCompiled { requested: kind }),
    }
}

#[cfg(feature = "postgres")]
mod postgres {
    use std::sync::Arc;

    use switchboard_core::{Backplane, ChannelNames};
    use switchboard_postgres::{PostgresBackplane, PostgresConfig};

    use super::{BackplaneSettings, OpenError};

    pub(super) fn open(settings: &BackplaneSettings) -> Result<Arc<dyn Backplane>, OpenError> {
        let url = settings
            .postgres_url
            .clone()
            .filter(|url| url.starts_with("postgres://") || url.starts_with("postgresql://"))
            .ok_or_else(|| {
                OpenError::Invalid(
                    "--backplane postgres needs a PostgreSQL --database-url (postgres://...)"
                        .to_owned(),
                )
            })?;
        let names =
            ChannelNames::new(&settings.prefix).map_err(|e| OpenError::Invalid(e.to_string()))?;
        let config = PostgresConfig::new(url)
            .with_schema(backplane_schema(&settings.prefix))
            .with_channel_names(names)
            .with_max_payload(settings.max_payload)
            .with_buffer_messages(settings.buffer_messages)
            .with_buffer_bytes(settings.buffer_bytes)
            .with_buffer_age(settings.buffer_age)
            .with_presence_ttl(settings.presence_ttl);
        let backplane =
            PostgresBackplane::new(config).map_err(|e| OpenError::Invalid(e.to_string()))?;
        Ok(Arc::new(backplane))
    }

    /// The schema of the backplane's tables: the prefix, lower-cased, with anything but
    /// letters, digits and `_` turned into `_`, and `_backplane` added.
    fn backplane_schema(prefix: &str) -> String {
        let mut schema: String = prefix
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '_'
                }
            })
            .collect();
        schema.push_str("_backplane");
        schema
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
    /// The store's backend could not be opened (database unreachable, migrations failed).
    #[error("cannot open the `{store}` store: {message}")]
    Backend {
        /// The requested store.
        store: StoreKind,
        /// What failed, in words (never a password).
        message: String,
    },
}

/// Capabilities of every store compiled into this build, in `--store` order.
pub fn compiled() -> Vec<Capabilities> {
    let mut stores = vec![MemoryStore::CAPABILITIES];
    #[cfg(feature = "groups")]
    stores.push(switchboard_groups::GroupStore::CAPABILITIES);
    #[cfg(feature = "sql")]
    stores.push(switchboard_sql::SqlStore::CAPABILITIES);
    #[cfg(feature = "azure")]
    stores.push(switchboard_azure::AzureStore::CAPABILITIES);
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
/// [`OpenError::NotCompiled`] when this build lacks that store, [`OpenError::Invalid`] when
/// its settings are missing or wrong, [`OpenError::Backend`] when its backend cannot be
/// opened.
pub async fn open(
    kind: StoreKind,
    settings: &StoreSettings,
) -> Result<Arc<dyn ConnectionStore>, OpenError> {
    let _ = settings;
    match kind {
        StoreKind::Memory => Ok(Arc::new(MemoryStore::new())),
        #[cfg(feature = "groups")]
        StoreKind::Groups => Ok(Arc::new(switchboard_groups::GroupStore::new())),
        #[cfg(feature = "sql")]
        StoreKind::Sql => {
            let url = settings.database_url.clone().ok_or_else(|| {
                OpenError::Invalid(
                    "--store sql needs --database-url (or SWITCHBOARD_DATABASE_URL): \
                     sqlite://switchboard.db for one machine, postgres://... for many servers"
                        .to_owned(),
                )
            })?;
            let config = switchboard_sql::SqlConfig::new(url)
                .with_schema(settings.database_schema.clone())
                .with_pool_size(settings.database_pool_size)
                .with_acquire_timeout(settings.database_acquire_timeout);
            let store =
                switchboard_sql::SqlStore::open(config)
                    .await
                    .map_err(|e| OpenError::Backend {
                        store: kind,
                        message: e.to_string(),
                    })?;
            Ok(Arc::new(store))
        }
        #[cfg(feature = "azure")]
        StoreKind::Azure => azure::open(settings).await,
        #[cfg(not(feature = "groups"))]
        StoreKind::Groups => Err(not_compiled(kind)),
        #[cfg(not(feature = "sql"))]
        StoreKind::Sql => Err(not_compiled(kind)),
        #[cfg(not(feature = "azure"))]
        StoreKind::Azure => Err(not_compiled(kind)),
    }
}

/// [`OpenError::NotCompiled`] for `kind`, naming the stores this build has.
#[cfg(not(all(feature = "groups", feature = "sql", feature = "azure")))]
fn not_compiled(kind: StoreKind) -> OpenError {
    OpenError::NotCompiled {
        requested: kind,
        available: compiled()
            .iter()
            .map(|c| c.strategy)
            .collect::<Vec<_>>()
            .join(", "),
    }
}

#[cfg(feature = "azure")]
mod azure {
    use std::sync::Arc;

    use switchboard_azure::{AzureConfig, AzureStore};
    use switchboard_core::ConnectionStore;

    use super::{OpenError, StoreKind, StoreSettings};

    /// What `--store azure` says when it has no connection string.
    const MISSING: &str = "--store azure needs --azure-connection-string (or \
        SWITCHBOARD_AZURE_CONNECTION_STRING): UseDevelopmentStorage=true for Azurite, or the \
        account's connection string";

    pub(super) async fn open(
        settings: &StoreSettings,
    ) -> Result<Arc<dyn ConnectionStore>, OpenError> {
        let connection_string = settings
            .azure_connection_string
            .as_deref()
            .filter(|s| !s.trim().is_empty())
            .ok_or_else(|| OpenError::Invalid(MISSING.to_owned()))?;
        // The configuration's errors describe what is wrong without repeating the string,
        // which holds the account key.
        let config = AzureConfig::from_connection_string(connection_string)
            .map_err(|e| OpenError::Invalid(format!("invalid --azure-connection-string: {e}")))?
            .with_table(&settings.azure_table)
            .map_err(|e| OpenError::Invalid(format!("invalid --azure-table: {e}")))?
            .with_request_timeout(settings.azure_request_timeout)
            .with_retry_budget(settings.azure_retry_budget)
            .with_max_in_flight(settings.azure_max_in_flight);
        let store = AzureStore::open(config)
            .await
            .map_err(|e| OpenError::Backend {
                store: StoreKind::Azure,
                message: e.to_string(),
            })?;
        Ok(Arc::new(store))
    }
}
