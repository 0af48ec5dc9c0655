//! The [`ConnectionStore`] trait: which user is behind which connection.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use async_trait::async_trait;

use crate::capabilities::Capabilities;
use crate::error::StoreError;
use crate::id::{ConnectionId, NodeId, UserId};
use crate::record::ConnectionRecord;

/// What [`ConnectionStore::remove`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub enum Removal {
    /// The connection was recorded for that user and is now gone.
    Removed,
    /// No such connection was recorded for that user; nothing changed. This is not an error:
    /// disconnect cleanup may race with a sweep, or run twice.
    NotFound,
}

/// One page request for [`ConnectionStore::users`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageRequest {
    /// Only users strictly after this one (in byte order of their ids) are returned; `None`
    /// starts at the beginning. Pass the previous page's [`UserPage::next`].
    pub after: Option<UserId>,
    /// Most users per page; at least 1 is always used. Default 100.
    pub limit: usize,
    /// Only users whose id starts with this text (byte for byte; `None` or empty: everyone).
    /// The cursor works within the prefix as without it.
    pub prefix: Option<String>,
}

impl PageRequest {
    /// The first page with `limit` users at most.
    pub fn first(limit: usize) -> Self {
        Self {
            after: None,
            limit,
            prefix: None,
        }
    }

    /// This request, limited to users whose id starts with `prefix` (empty: everyone).
    pub fn with_prefix(mut self, prefix: impl Into<String>) -> Self {
        let prefix = prefix.into();
        self.prefix = (!prefix.is_empty()).then_some(prefix);
        self
    }

    /// The prefix users must start with, if any (never empty).
    pub fn prefix(&self) -> Option<&str> {
        self.prefix.as_deref().filter(|p| !p.is_empty())
    }

    /// Whether `user` belongs on a page of this request: after the cursor and within the
    /// prefix.
    pub fn admits(&self, user: &UserId) -> bool {
        self.after.as_ref().is_none_or(|after| user > after)
            && self.prefix().is_none_or(|p| user.as_str().starts_with(p))
    }

    /// For stores that query a sorted range: the smallest id past which no user starts with
    /// the prefix (the prefix with its last character raised by one), or `None` when there
    /// is no prefix or no such bound. Users within the prefix are exactly those `>= prefix`
    /// and `< upper bound`, in byte order.
    pub fn prefix_upper_bound(&self) -> Option<String> {
        let mut chars: Vec<char> = self.prefix()?.chars().collect();
        while let Some(last) = chars.pop() {
            let next = (u32::from(last) + 1..=u32::from(char::MAX)).find_map(char::from_u32);
            if let Some(next) = next {
                chars.push(next);
                return Some(chars.into_iter().collect());
            }
        }
        None
    }

    /// `limit` clamped to at least 1.
    pub fn effective_limit(&self) -> usize {
        self.limit.max(1)
    }

    /// The page this request asks for, picked from `users` (distinct, in any order): the
    /// smallest ids after the cursor, sorted, with the cursor of the next page. For stores
    /// that scan an unordered map; the work is linear in the scan, not `n log n`.
    pub fn select(&self, users: impl IntoIterator<Item = UserId>) -> UserPage {
        let limit = self.effective_limit();
        let mut users: Vec<UserId> = users.into_iter().filter(|u| self.admits(u)).collect();
        let more = users.len() > limit;
        if more {
            // The `limit` smallest ids, without sorting the whole scan.
            users.select_nth_unstable(limit);
            users.truncate(limit);
        }
        users.sort_unstable();
        let next = if more { users.last().cloned() } else { None };
        UserPage { users, next }
    }
}

impl Default for PageRequest {
    fn default() -> Self {
        Self::first(100)
    }
}

/// A page of connected users, in ascending byte order of their ids.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct UserPage {
    /// Users on this page, each with at least one live connection when the page was read.
    pub users: Vec<UserId>,
    /// Cursor for the next page, `None` when this was the last one.
    pub next: Option<UserId>,
}

/// How many users and connections a store holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Counts {
    /// Users with at least one live connection.
    pub users: u64,
    /// Live connections.
    pub connections: u64,
}

/// Which authenticated user is behind which real-time connection.
///
/// One trait for the four user-mapping strategies (in-memory map, per-user groups, SQL table,
/// Azure table), used as `Arc<dyn ConnectionStore>` because the store is picked at run time.
/// The server calls [`add`](Self::add) when a connection is established,
/// [`remove`](Self::remove) when it ends (on every exit path) and
/// [`reconnect`](Self::reconnect) when a client re-attaches to the same connection.
///
/// # Contract
///
/// * Connection ids are unique within a store, and a connection id belongs to one user for its
///   whole life. Operations are keyed by `(user, connection id)`, the natural key of every
///   strategy (the Azure strategy partitions by user).
/// * A user is "connected" exactly while they have at least one recorded connection: removing
///   the last connection of a user removes the user.
/// * Answers are values, never views: a returned list does not change when the store does.
/// * Optional operations have default bodies returning [`StoreError::Unsupported`];
///   [`capabilities`](Self::capabilities) states up front which ones a store supports. A store
///   never answers an unsupported question with an empty result that looks real.
/// * All operations are safe to call concurrently from many tasks.
/// * With [leases](Capabilities::leases), [`connections`](Self::connections),
///   [`users`](Self::users) and [`counts`](Self::counts) ignore the records of every node
///   whose lease has expired by the store's clock, from the moment it expires; records of a
///   node that never took a lease count as live until a [`sweep`](Self::sweep) removes them.
#[async_trait]
pub trait ConnectionStore: Send + Sync + fmt::Debug + 'static {
    /// What this store instance can do.
    fn capabilities(&self) -> Capabilities;

    /// Records a newly established connection.
    ///
    /// # Errors
    ///
    /// [`StoreError::Conflict`] if the connection id is already recorded for this user (the
    /// existing record is left unchanged); store failures otherwise.
    async fn add(&self, record: ConnectionRecord) -> Result<(), StoreError>;

    /// Removes a connection of `user`. Removing an unknown connection (or one recorded for
    /// another user) changes nothing and answers [`Removal::NotFound`].
    ///
    /// # Errors
    ///
    /// Store failures only.
    async fn remove(&self, user: &UserId, id: &ConnectionId) -> Result<Removal, StoreError>;

    /// Records that a connection re-attached (SignalR stateful reconnect): inserts the record if
    /// it is missing (for example after a sweep) or replaces the stored one (node, user agent,
    /// connection time). Idempotent.
    ///
    /// # Errors
    ///
    /// Store failures only.
    async fn reconnect(&self, record: ConnectionRecord) -> Result<(), StoreError>;

    /// The live connections of `user`, in no particular order; empty when the user has none.
    /// Connections of nodes whose lease expired are not live.
    ///
    /// # Errors
    ///
    /// [`StoreError::Unsupported`] when [`Capabilities::lookup`] is `false`; store failures.
    async fn connections(&self, user: &UserId) -> Result<Vec<ConnectionRecord>, StoreError> {
        let _ = user;
        Err(StoreError::unsupported(
            self.capabilities().strategy,
            "looking up a user's connections",
        ))
    }

    /// One page of connected users, in ascending byte order of their ids. A user whose only
    /// connections are on nodes whose lease expired is not connected.
    ///
    /// # Errors
    ///
    /// [`StoreError::Unsupported`] when [`Capabilities::list_users`] is
    /// [`UserListing::Unsupported`](crate::UserListing::Unsupported); store failures.
    async fn users(&self, page: PageRequest) -> Result<UserPage, StoreError> {
        let _ = page;
        Err(StoreError::unsupported(
            self.capabilities().strategy,
            "listing connected users",
        ))
    }

    /// How many users and connections are live, by the same rules as
    /// [`connections`](Self::connections) and [`users`](Self::users).
    ///
    /// # Errors
    ///
    /// [`StoreError::Unsupported`] when the store cannot list users; store failures.
    async fn counts(&self) -> Result<Counts, StoreError> {
        Err(StoreError::unsupported(
            self.capabilities().strategy,
            "counting connected users",
        ))
    }

    /// Live connections per node, by the same rules as [`counts`](Self::counts): only nodes
    /// holding at least one appear. For operators' views ("how is the load spread").
    ///
    /// # Errors
    ///
    /// [`StoreError::Unsupported`] when the store cannot list users; store failures.
    async fn counts_by_node(&self) -> Result<BTreeMap<NodeId, u64>, StoreError> {
        Err(StoreError::unsupported(
            self.capabilities().strategy,
            "counting connections per node",
        ))
    }

    /// Takes or renews the lease of `node` for `ttl`, measured by the **store's** clock (a
    /// database's `now()`, the process clock of an in-memory store), so the clocks of the
    /// nodes never need to agree. Answers what the store found, so that a node learns when
    /// its lease had lapsed (and its records may have been ignored or swept meanwhile).
    ///
    /// A node renews well before its lease runs out (the server: every third of the lease).
    /// Records of a node whose lease expired are ignored by [`connections`](Self::connections),
    /// [`users`](Self::users) and [`counts`](Self::counts) at once, and removed by the next
    /// [`sweep`](Self::sweep). A `ttl` longer than [`Lease::MAX_TTL`] is shortened to it.
    ///
    /// # Errors
    ///
    /// [`StoreError::Unsupported`] unless [`Capabilities::leases`] is `true`; store failures.
    async fn heartbeat(&self, node: &NodeId, ttl: Duration) -> Result<Lease, StoreError> {
        let _ = (node, ttl);
        Err(StoreError::unsupported(
            self.capabilities().strategy,
            "node leases",
        ))
    }

    /// Removes every connection held by a node whose lease has expired by the store's clock,
    /// or that never took a lease, and forgets those leases. A record is only removed if its
    /// node's lease is expired at the moment it is removed, so a node that renews during a
    /// sweep keeps the records it re-asserts. Returns how many connections were removed.
    /// Idempotent; any node may run it.
    ///
    /// # Errors
    ///
    /// [`StoreError::Unsupported`] unless the store has leases; store failures.
    async fn sweep(&self) -> Result<u64, StoreError> {
        Err(StoreError::unsupported(
            self.capabilities().strategy,
            "sweeping expired nodes",
        ))
    }

    /// Ends the lease of `node` and removes every connection it holds, and no other, for a
    /// node that stops cleanly. Returns how many connections were removed (normally 0: the
    /// node removes its connections one by one as they close; this catches what is left). The
    /// node's next [`heartbeat`](Self::heartbeat) takes a new lease.
    ///
    /// # Errors
    ///
    /// [`StoreError::Unsupported`] unless the store has leases; store failures.
    async fn release(&self, node: &NodeId) -> Result<u64, StoreError> {
        let _ = node;
        Err(StoreError::unsupported(
            self.capabilities().strategy,
            "releasing node leases",
        ))
    }
}

/// What [`ConnectionStore::heartbeat`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub enum Lease {
    /// The node held no lease (its first heartbeat, or its lease was swept): a new one was
    /// taken. For a node that was already serving, its records may have been swept.
    Taken,
    /// The node's lease was live and now runs for the new `ttl`.
    Renewed,
    /// The node's lease had expired but was not swept yet; it is live again. Meanwhile its
    /// records were ignored by lookups, and a concurrent sweep may have removed some.
    Lapsed,
}

impl Lease {
    /// The longest lease a store grants (a year); a longer `ttl` given to
    /// [`ConnectionStore::heartbeat`] is shortened to this.
    pub const MAX_TTL: Duration = Duration::from_secs(365 * 24 * 60 * 60);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(names: &[&str]) -> Vec<UserId> {
        names
            .iter()
            .map(|n| UserId::new(n).expect("valid"))
            .collect()
    }

    #[test]
    fn select_picks_the_next_page_in_byte_order() {
        let all = ids(&["d", "B", "a", "c", "e"]);
        let first = PageRequest::first(2).select(all.clone());
        assert_eq!(first.users, ids(&["B", "a"]));
        assert_eq!(first.next, Some(ids(&["a"])[0].clone()));
        let second = PageRequest {
            after: first.next,
            limit: 2,
            prefix: None,
        }
        .select(all.clone());
        assert_eq!(second.users, ids(&["c", "d"]));
        let last = PageRequest {
            after: second.next,
            limit: 2,
            prefix: None,
        }
        .select(all);
        assert_eq!(last.users, ids(&["e"]));
        assert_eq!(last.next, None);
        assert_eq!(
            PageRequest::first(0).select(ids(&["x", "y"])).users.len(),
            1
        );
    }

    #[test]
    fn a_prefix_limits_the_page_and_bounds_the_range() {
        let all = ids(&["al", "alice", "alicia", "bob", "ali\u{10FFFF}z", "Alice"]);
        let page = PageRequest::first(10)
            .with_prefix("ali")
            .select(all.clone());
        assert_eq!(page.users, ids(&["alice", "alicia", "ali\u{10FFFF}z"]));
        let first = PageRequest::first(1).with_prefix("ali").select(all.clone());
        let rest = PageRequest {
            after: first.next.clone(),
            ..PageRequest::first(10).with_prefix("ali")
        }
        .select(all);
        assert_eq!(first.users.len() + rest.users.len(), 3);
        assert_eq!(PageRequest::first(1).with_prefix("").prefix(), None);
        let bound = |p: &str| PageRequest::first(1).with_prefix(p).prefix_upper_bound();
        assert_eq!(bound("ali").as_deref(), Some("alj"));
        assert_eq!(bound("a\u{D7FF}").as_deref(), Some("a\u{E000}"));
        assert_eq!(bound("a\u{10FFFF}").as_deref(), Some("b"));
        assert_eq!(bound("\u{10FFFF}"), None);
        assert_eq!(PageRequest::first(1).prefix_upper_bound(), None);
    }
}
