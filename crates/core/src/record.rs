//! The connection record a store keeps for each live connection.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::id::{ConnectionId, NodeId, UserId};

/// One live connection: who, which connection, which node holds its socket, and since when.
///
/// This mirrors the classic "Connection" table (connection id, user, user agent, connected
/// flag): a record exists exactly while the connection is live, so the connected flag is the
/// record's presence.
///
/// `connected_at` is kept at millisecond precision (every store can represent that) and the user
/// agent is cut to [`ConnectionRecord::MAX_USER_AGENT`] bytes, both here, so a record reads back
/// from any store exactly as it was written. Cloning is cheap: the strings are shared.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ConnectionRecord {
    id: ConnectionId,
    user: UserId,
    node: NodeId,
    user_agent: Option<Arc<str>>,
    connected_at: SystemTime,
}

impl ConnectionRecord {
    /// Longest user agent kept, in bytes; longer ones are cut at a character boundary.
    pub const MAX_USER_AGENT: usize = 512;

    /// A record without a user agent. `connected_at` is truncated to whole milliseconds; times
    /// before the Unix epoch become the epoch.
    pub fn new(id: ConnectionId, user: UserId, node: NodeId, connected_at: SystemTime) -> Self {
        Self {
            id,
            user,
            node,
            user_agent: None,
            connected_at: truncate_to_millis(connected_at),
        }
    }

    /// Sets the user agent (cut to [`ConnectionRecord::MAX_USER_AGENT`] bytes). An empty string
    /// means "no user agent".
    #[must_use]
    pub fn with_user_agent(mut self, user_agent: &str) -> Self {
        let cut = Self::cut_user_agent(user_agent);
        self.user_agent = (!cut.is_empty()).then(|| Arc::from(cut));
        self
    }

    /// The part of `user_agent` a record keeps: at most [`ConnectionRecord::MAX_USER_AGENT`]
    /// bytes, cut at a character boundary. Servers cut client-supplied user agents with this
    /// as soon as they read them, so an oversized header never stays in memory.
    pub fn cut_user_agent(user_agent: &str) -> &str {
        let mut end = user_agent.len().min(Self::MAX_USER_AGENT);
        while !user_agent.is_char_boundary(end) {
            end -= 1;
        }
        &user_agent[..end]
    }

    /// Returns the same record under another node (tests, migrations between stores). A
    /// stateful re-attach always lands on the node that holds the connection (sticky
    /// sessions), so it keeps its node.
    #[must_use]
    pub fn with_node(mut self, node: NodeId) -> Self {
        self.node = node;
        self
    }

    /// The connection's public id.
    pub fn id(&self) -> &ConnectionId {
        &self.id
    }

    /// The user who owns the connection.
    pub fn user(&self) -> &UserId {
        &self.user
    }

    /// The node holding the connection's socket.
    pub fn node(&self) -> &NodeId {
        &self.node
    }

    /// The client's user agent, if it sent one.
    pub fn user_agent(&self) -> Option<&str> {
        self.user_agent.as_deref()
    }

    /// When the connection was established (millisecond precision).
    pub fn connected_at(&self) -> SystemTime {
        self.connected_at
    }

    /// `connected_at` as milliseconds since the Unix epoch (how external stores persist it).
    pub fn connected_at_millis(&self) -> i64 {
        millis_since_epoch(self.connected_at)
    }
}

/// Milliseconds since the Unix epoch, saturating; times before the epoch give 0.
pub fn millis_since_epoch(time: SystemTime) -> i64 {
    time.duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// The inverse of [`millis_since_epoch`]; negative values give the epoch.
pub fn from_millis_since_epoch(millis: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(u64::try_from(millis).unwrap_or(0))
}

fn truncate_to_millis(time: SystemTime) -> SystemTime {
    from_millis_since_epoch(millis_since_epoch(time))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> ConnectionRecord {
        ConnectionRecord::new(
            ConnectionId::new("c1").expect("valid"),
            UserId::new("u").expect("valid"),
            NodeId::new("n").expect("valid"),
            UNIX_EPOCH + Duration::from_nanos(1_234_567_891),
        )
    }

    #[test]
    fn connected_at_is_kept_in_milliseconds() {
        let r = record();
        assert_eq!(r.connected_at(), UNIX_EPOCH + Duration::from_millis(1234));
        assert_eq!(r.connected_at_millis(), 1234);
        assert_eq!(from_millis_since_epoch(1234), r.connected_at());
    }

    #[test]
    fn user_agent_is_cut_at_a_char_boundary() {
        let long = "é".repeat(300); // 600 bytes
        let r = record().with_user_agent(&long);
        let ua = r.user_agent().expect("set");
        assert_eq!(ua.len(), 512);
        assert!(record().with_user_agent("").user_agent().is_none());
    }
}
