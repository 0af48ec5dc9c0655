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
}

impl fmt::Display for BackplaneKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::None => "none",
        })
    }
}

/// Opens the backplane `kind`; `None` for [`BackplaneKind::None`].
///
/// # Errors
///
/// [`OpenError`] when the backplane cannot be opened.
pub async fn open_backplane(kind: BackplaneKind) -> Result<Option<Arc<dyn Backplane>>, OpenError> {
    match kind {
        BackplaneKind::None => Ok(None),
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
