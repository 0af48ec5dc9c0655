//! The one error type every store returns.

use std::time::Duration;

use crate::id::{ConnectionId, UserId};

/// A boxed error from a store's driver (database, HTTP client, ...).
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Everything that can go wrong in a [`ConnectionStore`](crate::ConnectionStore) operation.
///
/// One non-generic enum for all stores keeps the trait object-safe. Use
/// [`StoreError::is_transient`] to decide whether retrying later can help.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The store cannot do this operation honestly; its
    /// [`Capabilities`](crate::Capabilities) say so up front.
    #[error("the `{store}` store does not support {operation}")]
    Unsupported {
        /// The strategy name of the store.
        store: &'static str,
        /// The operation, in words.
        operation: &'static str,
    },
    /// [`add`](crate::ConnectionStore::add) was given a connection id that is already recorded.
    #[error("connection `{id}` of user `{user}` is already recorded")]
    Conflict {
        /// The user of the rejected record.
        user: UserId,
        /// The duplicate connection id.
        id: ConnectionId,
    },
    /// The store could not be reached (connection refused, pool exhausted, service down).
    /// Transient.
    #[error("the connection store is unavailable: {message}")]
    Unavailable {
        /// What failed, in words.
        message: String,
        /// The driver's error, if any.
        #[source]
        source: Option<BoxError>,
    },
    /// The operation did not finish in time. Transient.
    #[error("the connection store did not answer within {0:?}")]
    Timeout(Duration),
    /// The store answered with an error.
    #[error("the connection store failed: {message}")]
    Backend {
        /// What failed, in words.
        message: String,
        /// Whether retrying later can succeed (deadlock, throttling, failover).
        transient: bool,
        /// The driver's error, if any.
        #[source]
        source: Option<BoxError>,
    },
    /// Data read back from the store does not form a valid record (for example an id that no
    /// longer passes validation). Permanent.
    #[error("the connection store holds invalid data: {0}")]
    Corrupt(String),
    /// The store works but refuses the operation by policy (a per-user limit, a banned user, a
    /// quota). Permanent: retrying the same operation gets the same answer. `reason` is shown
    /// to the client, so it must not reveal internals.
    #[error("the connection store refused: {reason}")]
    Refused {
        /// Why, in words meant for the client.
        reason: String,
    },
}

impl StoreError {
    /// Shorthand for [`StoreError::Unsupported`].
    pub fn unsupported(store: &'static str, operation: &'static str) -> Self {
        Self::Unsupported { store, operation }
    }

    /// Shorthand for [`StoreError::Refused`].
    pub fn refused(reason: impl Into<String>) -> Self {
        Self::Refused {
            reason: reason.into(),
        }
    }

    /// Whether the same operation may succeed if retried later (the store was down, slow,
    /// throttled, or hit a deadlock). `Unsupported`, `Conflict`, `Corrupt` and `Refused` are
    /// permanent.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Unavailable { .. } | Self::Timeout(_) => true,
            Self::Backend { transient, .. } => *transient,
            Self::Unsupported { .. }
            | Self::Conflict { .. }
            | Self::Corrupt(_)
            | Self::Refused { .. } => false,
        }
    }

    /// Whether this is [`StoreError::Unsupported`].
    pub fn is_unsupported(&self) -> bool {
        matches!(self, Self::Unsupported { .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transient_errors_are_classified() {
        assert!(StoreError::Timeout(Duration::from_secs(1)).is_transient());
        assert!(
            StoreError::Unavailable {
                message: "refused".into(),
                source: None
            }
            .is_transient()
        );
        assert!(!StoreError::unsupported("groups", "listing users").is_transient());
        assert!(!StoreError::Corrupt("bad id".into()).is_transient());
        assert!(!StoreError::refused("at most 3 tabs").is_transient());
        assert_eq!(
            StoreError::refused("at most 3 tabs").to_string(),
            "the connection store refused: at most 3 tabs"
        );
        assert_eq!(
            StoreError::unsupported("groups", "listing users").to_string(),
            "the `groups` store does not support listing users"
        );
    }
}
