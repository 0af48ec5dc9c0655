//! The stores compiled into this build, chosen at run time by name (`--store`).

use std::fmt;
use std::sync::Arc;

use switchboard_core::{Capabilities, ConnectionStore};
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
}

/// Capabilities of every store compiled into this build, in `--store` order.
pub fn compiled() -> Vec<Capabilities> {
    vec![MemoryStore::CAPABILITIES]
}

/// Opens the store `kind`.
///
/// # Errors
///
/// [`OpenError::NotCompiled`] when this build lacks that store.
pub async fn open(kind: StoreKind) -> Result<Arc<dyn ConnectionStore>, OpenError> {
    match kind {
        StoreKind::Memory => Ok(Arc::new(MemoryStore::new())),
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
