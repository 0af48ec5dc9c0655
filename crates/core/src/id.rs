//! Identifiers: users, connections and nodes.
//!
//! Every identifier is a validated newtype. The constructors are the only place in Switchboard
//! where raw text becomes an id, so normalization happens exactly once and every store, hub and
//! backplane sees the same bytes for the same id.

use std::borrow::Borrow;
use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// Why a string was refused as an identifier.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InvalidId {
    /// The id is empty (for a user id: empty after trimming whitespace).
    #[error("{kind} must not be empty")]
    Empty {
        /// Which kind of id was being built.
        kind: &'static str,
    },
    /// The id is longer than its kind allows.
    #[error("{kind} is {len} bytes long; at most {max} bytes are allowed")]
    TooLong {
        /// Which kind of id was being built.
        kind: &'static str,
        /// Length of the (normalized) input in bytes.
        len: usize,
        /// The limit for this kind.
        max: usize,
    },
    /// The id contains a character its kind does not allow.
    #[error("{kind} contains the character {found:?}, which is not allowed ({rule})")]
    BadCharacter {
        /// Which kind of id was being built.
        kind: &'static str,
        /// The first offending character.
        found: char,
        /// The rule that was broken, in words.
        rule: &'static str,
    },
}

/// The identity of an authenticated user.
///
/// # Normalization rule
///
/// [`UserId::new`] is the only way to build a `UserId`, and it applies exactly one rule:
/// **leading and trailing whitespace is removed** (Unicode `White_Space`). Nothing else is
/// changed: user ids are **case-sensitive** and compared byte for byte, because identity
/// providers treat the `sub` claim that way and folding case could merge two distinct accounts.
/// After trimming, an id must be 1 to [`UserId::MAX_LEN`] bytes long and contain no control
/// characters.
///
/// Because stores only ever receive `UserId` values, a store cannot normalize on insert but not
/// on delete (the bug that leaks rows in the classic Azure Table sample): there is nothing left to
/// normalize.
///
/// Cloning is cheap (a reference count).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct UserId(Arc<str>);

impl UserId {
    /// Longest accepted user id, in bytes, after trimming.
    pub const MAX_LEN: usize = 1024;

    /// Builds a user id from raw text, applying the normalization rule described on the type.
    ///
    /// # Errors
    ///
    /// [`InvalidId`] when the trimmed text is empty, longer than [`UserId::MAX_LEN`] bytes, or
    /// contains a control character.
    pub fn new(raw: &str) -> Result<Self, InvalidId> {
        const KIND: &str = "user id";
        let trimmed = raw.trim();
        if trimmed.is_empty() {
            return Err(InvalidId::Empty { kind: KIND });
        }
        if trimmed.len() > Self::MAX_LEN {
            return Err(InvalidId::TooLong {
                kind: KIND,
                len: trimmed.len(),
                max: Self::MAX_LEN,
            });
        }
        if let Some(found) = trimmed.chars().find(|c| c.is_control()) {
            return Err(InvalidId::BadCharacter {
                kind: KIND,
                found,
                rule: "control characters are not allowed",
            });
        }
        Ok(Self(Arc::from(trimmed)))
    }

    /// The normalized id.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Checks the shared rule of connection and node ids: 1 to `max` bytes from the URL-safe
/// unreserved set `A-Z a-z 0-9 - . _ ~`.
fn check_token(kind: &'static str, raw: &str, max: usize) -> Result<(), InvalidId> {
    if raw.is_empty() {
        return Err(InvalidId::Empty { kind });
    }
    if raw.len() > max {
        return Err(InvalidId::TooLong {
            kind,
            len: raw.len(),
            max,
        });
    }
    if let Some(found) = raw
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_' | '~')))
    {
        return Err(InvalidId::BadCharacter {
            kind,
            found,
            rule: "only A-Z, a-z, 0-9, '-', '.', '_' and '~' are allowed",
        });
    }
    Ok(())
}

/// The public id of one real-time connection (the SignalR `connectionId`).
///
/// It is safe to show to other users; it is **not** the secret connection token a client
/// presents to attach its transport. Connection ids are unique within a store: the server
/// generates them with 128 bits of randomness, and a connection id belongs to one user for its
/// whole life.
///
/// Valid ids are 1 to [`ConnectionId::MAX_LEN`] bytes from `A-Z a-z 0-9 - . _ ~`, so they can be
/// used unchanged in URLs, SQL keys, Azure Table row keys and Redis channel names. No
/// normalization is applied.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ConnectionId(Arc<str>);

impl ConnectionId {
    /// Longest accepted connection id, in bytes.
    pub const MAX_LEN: usize = 128;

    /// Validates and wraps a connection id.
    ///
    /// # Errors
    ///
    /// [`InvalidId`] when `raw` is empty, too long, or has a character outside the URL-safe set.
    pub fn new(raw: &str) -> Result<Self, InvalidId> {
        check_token("connection id", raw, Self::MAX_LEN)?;
        Ok(Self(Arc::from(raw)))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The id of one Switchboard server process (a node) sharing a store or a backplane.
///
/// Every connection record names the node that holds its socket, so that the connections of a
/// node that died can be swept once its lease expires. Same character rules as
/// [`ConnectionId`], at most [`NodeId::MAX_LEN`] bytes.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct NodeId(Arc<str>);

impl NodeId {
    /// Longest accepted node id, in bytes.
    pub const MAX_LEN: usize = 64;

    /// Validates and wraps a node id.
    ///
    /// # Errors
    ///
    /// [`InvalidId`] when `raw` is empty, too long, or has a character outside the URL-safe set.
    pub fn new(raw: &str) -> Result<Self, InvalidId> {
        check_token("node id", raw, Self::MAX_LEN)?;
        Ok(Self(Arc::from(raw)))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

macro_rules! id_impls {
    ($($ty:ident),*) => {$(
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:?})", stringify!($ty), &*self.0)
            }
        }

        impl AsRef<str> for $ty {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl Borrow<str> for $ty {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $ty {
            type Error = InvalidId;
            fn try_from(raw: String) -> Result<Self, InvalidId> {
                Self::new(&raw)
            }
        }

        impl TryFrom<&str> for $ty {
            type Error = InvalidId;
            fn try_from(raw: &str) -> Result<Self, InvalidId> {
                Self::new(raw)
            }
        }

        impl From<$ty> for String {
            fn from(id: $ty) -> String {
                id.0.to_string()
            }
        }

        impl std::str::FromStr for $ty {
            type Err = InvalidId;
            fn from_str(raw: &str) -> Result<Self, InvalidId> {
                Self::new(raw)
            }
        }
    )*};
}

id_impls!(UserId, ConnectionId, NodeId);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_ids_are_trimmed_and_nothing_else() {
        let id = UserId::new("  Alice \t").expect("valid");
        assert_eq!(id.as_str(), "Alice");
        assert_ne!(id, UserId::new("alice").expect("valid"));
        assert_eq!(
            UserId::new("a/b#c?d\\e").expect("valid").as_str(),
            "a/b#c?d\\e"
        );
    }

    #[test]
    fn bad_user_ids_are_refused_with_a_reason() {
        assert_eq!(
            UserId::new("   "),
            Err(InvalidId::Empty { kind: "user id" })
        );
        assert!(matches!(
            UserId::new(&"x".repeat(1025)),
            Err(InvalidId::TooLong { len: 1025, .. })
        ));
        assert!(matches!(
            UserId::new("a\u{0}b"),
            Err(InvalidId::BadCharacter { found: '\u{0}', .. })
        ));
        let message = UserId::new("").expect_err("empty").to_string();
        assert_eq!(message, "user id must not be empty");
    }

    #[test]
    fn connection_ids_are_url_safe() {
        assert!(ConnectionId::new("abc-DEF_012.~").is_ok());
        assert!(matches!(
            ConnectionId::new("a/b"),
            Err(InvalidId::BadCharacter { found: '/', .. })
        ));
        assert!(ConnectionId::new("").is_err());
        assert!(NodeId::new(&"n".repeat(65)).is_err());
    }

    #[test]
    fn serde_goes_through_the_constructor() {
        let id: UserId = serde_json::from_str("\" bob \"").expect("valid");
        assert_eq!(id.as_str(), "bob");
        assert!(serde_json::from_str::<UserId>("\"  \"").is_err());
        assert!(serde_json::from_str::<ConnectionId>("\"a b\"").is_err());
        assert_eq!(serde_json::to_string(&id).expect("serializes"), "\"bob\"");
    }
}
