//! The node's own live sockets: connection id → outgoing queue, which connections each user has
//! here, and local groups.
//!
//! This is not the [`ConnectionStore`](switchboard_core::ConnectionStore): the store says which
//! connections a user has anywhere; the registry holds the write ends of the sockets this node
//! serves.
//!
//! A user's connections are indexed apart from the groups a hub names, so no group name a
//! client can choose ever reaches another user's deliveries.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use axum::extract::ws::Utf8Bytes;
use dashmap::DashMap;
use switchboard_core::{ConnectionId, ConnectionRecord, NodeId, UserId};

use crate::mailbox::{Closing, Mailbox, Offer, Sent};

/// The write side of one local connection.
#[derive(Debug)]
struct LocalConnection {
    mailbox: Arc<Mailbox>,
    user: UserId,
    /// The rest of its store record, kept to record it again when the store lost it.
    user_agent: Option<Arc<str>>,
    connected_at_ms: u64,
    groups: Vec<Arc<str>>,
}

fn millis(record: &ConnectionRecord) -> u64 {
    u64::try_from(record.connected_at_millis()).unwrap_or(0)
}

/// What [`Registry::join`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Joined {
    /// The connection joined the group now.
    Now,
    /// It was a member already.
    Already,
    /// No such connection on this node.
    NotLocal,
}

/// A user already holds as many connections on this node as allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TooManyConnections {
    /// The per-user limit.
    pub(crate) limit: usize,
}

/// What a delivery to several connections did, so far.
#[derive(Debug, Default)]
pub(crate) struct Fanout {
    /// Connections the record was queued for.
    pub(crate) queued: usize,
    /// Connections that were not reading (and are being closed).
    pub(crate) not_reading: usize,
    /// Mailboxes that were full: the sender waits for room in them.
    full: Vec<Arc<Mailbox>>,
}

impl Fanout {
    /// Offers `record` to one mailbox without waiting; keeps it for [`Fanout::finish`] when
    /// full.
    fn offer(&mut self, mailbox: &Arc<Mailbox>, record: &Utf8Bytes) {
        match mailbox.offer(record) {
            Offer::Done(sent) => self.count(sent),
            Offer::Full => self.full.push(mailbox.clone()),
        }
    }

    fn count(&mut self, sent: Sent) {
        match sent {
            Sent::Queued => self.queued += 1,
            Sent::NotReading => self.not_reading += 1,
            Sent::Gone => {}
        }
    }

    /// Waits (for at most `wait`, all at once) for room in the mailboxes that were full, and
    /// queues the record there. Returns the ids of connections closed here for not reading,
    /// for the caller to log.
    pub(crate) async fn finish(&mut self, record: &Utf8Bytes, wait: Duration) -> usize {
        if self.full.is_empty() {
            return 0;
        }
        let full = std::mem::take(&mut self.full);
        let results = futures_util::future::join_all(
            full.iter()
                .map(|mailbox| mailbox.push_waiting(record, wait)),
        )
        .await;
        let mut closed_here = 0;
        for (sent, closed) in results {
            self.count(sent);
            closed_here += usize::from(closed);
        }
        closed_here
    }
}

/// Local connections, users and groups of this node.
#[derive(Debug, Default)]
pub(crate) struct Registry {
    connections: DashMap<ConnectionId, LocalConnection>,
    /// Each user's connections on this node. Lock order: `users` before `connections`.
    users: DashMap<UserId, Vec<ConnectionId>>,
    /// Members of the groups a hub names. Lock order: `connections` before `groups`.
    groups: DashMap<Arc<str>, HashSet<ConnectionId>>,
}

impl Registry {
    /// Registers the connection of `record` (whose user agent is `user_agent`, shared rather
    /// than copied); returns its mailbox, which holds at most `queue_size` bytes of records.
    /// Refused when its user already has `max_per_user` connections here.
    pub(crate) fn insert(
        &self,
        record: &ConnectionRecord,
        user_agent: Option<&Arc<str>>,
        queue_size: usize,
        max_per_user: usize,
    ) -> Result<Arc<Mailbox>, TooManyConnections> {
        let id = record.id().clone();
        let mut ids = self.users.entry(record.user().clone()).or_default();
        if ids.len() >= max_per_user.max(1) {
            return Err(TooManyConnections {
                limit: max_per_user.max(1),
            });
        }
        ids.push(id.clone());
        let mailbox = Arc::new(Mailbox::new(queue_size));
        // Inserted while the user's entry is locked: a concurrent insert for the same user
        // sees the count including this one.
        self.connections.insert(
            id,
            LocalConnection {
                mailbox: mailbox.clone(),
                user: record.user().clone(),
                user_agent: user_agent.cloned(),
                connected_at_ms: millis(record),
                groups: Vec::new(),
            },
        );
        Ok(mailbox)
    }

    /// Unregisters a connection, takes it out of its user's index and its groups, and wakes any
    /// sender waiting for room in its queue. Returns the groups it was a member of, or `None`
    /// when it was not registered.
    pub(crate) fn remove(&self, id: &ConnectionId) -> Option<Vec<Arc<str>>> {
        let (_, conn) = self.connections.remove(id)?;
        conn.mailbox.close(Closing::Gone);
        self.users.remove_if_mut(&conn.user, |_, ids| {
            ids.retain(|c| c != id);
            ids.is_empty()
        });
        for group in &conn.groups {
            self.groups.remove_if_mut(group, |_, members| {
                members.remove(id);
                members.is_empty()
            });
        }
        Some(conn.groups)
    }

    /// The store records of every local connection (held by `node`), as registered.
    pub(crate) fn records(&self, node: &NodeId) -> Vec<ConnectionRecord> {
        self.connections
            .iter()
            .map(|conn| {
                let record = ConnectionRecord::new(
                    conn.key().clone(),
                    conn.user.clone(),
                    node.clone(),
                    UNIX_EPOCH + Duration::from_millis(conn.connected_at_ms),
                );
                match &conn.user_agent {
                    Some(ua) => record.with_user_agent(ua),
                    None => record,
                }
            })
            .collect()
    }

    /// Keeps the connection time of a record written again (after a re-attach).
    pub(crate) fn set_record(&self, record: &ConnectionRecord) {
        if let Some(mut conn) = self.connections.get_mut(record.id()) {
            conn.connected_at_ms = millis(record);
        }
    }

    /// Whether the connection is on this node.
    pub(crate) fn contains(&self, id: &ConnectionId) -> bool {
        self.connections.contains_key(id)
    }

    /// Number of local connections.
    pub(crate) fn len(&self) -> usize {
        self.connections.len()
    }

    /// Number of `user`'s connections on this node.
    pub(crate) fn user_connections(&self, user: &UserId) -> usize {
        self.users.get(user).map_or(0, |ids| ids.len())
    }

    /// Offers `record` to each connection without waiting; full ones are kept in `fanout` for
    /// [`Fanout::finish`].
    pub(crate) fn offer<'a>(
        &self,
        ids: impl IntoIterator<Item = &'a ConnectionId>,
        record: &Utf8Bytes,
        fanout: &mut Fanout,
    ) {
        for id in ids {
            let _local = self.offer_one(id, record, fanout);
        }
    }

    /// Offers `record` to one connection; returns whether it is on this node.
    pub(crate) fn offer_one(
        &self,
        id: &ConnectionId,
        record: &Utf8Bytes,
        fanout: &mut Fanout,
    ) -> bool {
        match self.connections.get(id) {
            Some(conn) => {
                fanout.offer(&conn.mailbox, record);
                true
            }
            None => false,
        }
    }

    /// Offers `record` to every connection of `user` on this node.
    pub(crate) fn offer_user(&self, user: &UserId, record: &Utf8Bytes, fanout: &mut Fanout) {
        // Offering takes connection locks while the user's entry is read-locked: the lock
        // order is users before connections, as in `insert`.
        if let Some(ids) = self.users.get(user) {
            self.offer(ids.iter(), record, fanout);
        }
    }

    /// Offers `record` to every member of a local group.
    pub(crate) fn offer_group(&self, group: &str, record: &Utf8Bytes, fanout: &mut Fanout) {
        let members: Vec<ConnectionId> = self
            .groups
            .get(group)
            .map(|m| m.iter().cloned().collect())
            .unwrap_or_default();
        self.offer(&members, record, fanout);
    }

    /// Offers `record` to every local connection.
    pub(crate) fn offer_all(&self, record: &Utf8Bytes, fanout: &mut Fanout) {
        for conn in &self.connections {
            fanout.offer(&conn.mailbox, record);
        }
    }

    /// Adds a local connection to a group.
    pub(crate) fn join(&self, id: &ConnectionId, group: &str) -> Joined {
        let Some(mut conn) = self.connections.get_mut(id) else {
            return Joined::NotLocal;
        };
        if conn.groups.iter().any(|g| &**g == group) {
            return Joined::Already;
        }
        let name: Arc<str> = Arc::from(group);
        // Joined while the connection's entry is locked: a concurrent `remove` either ran
        // before (and this join fails above) or runs after and sees the group in the list.
        self.groups
            .entry(name.clone())
            .or_default()
            .insert(id.clone());
        conn.groups.push(name);
        Joined::Now
    }

    /// Takes a local connection out of a group. Returns whether it was a member.
    pub(crate) fn leave(&self, id: &ConnectionId, group: &str) -> bool {
        let Some(mut conn) = self.connections.get_mut(id) else {
            return false;
        };
        let before = conn.groups.len();
        conn.groups.retain(|g| &**g != group);
        let was_member = conn.groups.len() != before;
        self.groups.remove_if_mut(group, |_, members| {
            members.remove(id);
            members.is_empty()
        });
        was_member
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> ConnectionId {
        ConnectionId::new(s).expect("valid")
    }

    fn user(s: &str) -> UserId {
        UserId::new(s).expect("valid")
    }

    impl Registry {
        fn insert_test(
            &self,
            record: &ConnectionRecord,
            queue_size: usize,
            max_per_user: usize,
        ) -> Result<Arc<Mailbox>, TooManyConnections> {
            self.insert(record, None, queue_size, max_per_user)
        }
    }

    fn rec(conn: &str, u: &str) -> ConnectionRecord {
        ConnectionRecord::new(
            id(conn),
            user(u),
            switchboard_core::NodeId::new("n").expect("valid"),
            std::time::SystemTime::UNIX_EPOCH,
        )
    }

    fn members(registry: &Registry, group: &str) -> Vec<ConnectionId> {
        let mut members: Vec<ConnectionId> = registry
            .groups
            .get(group)
            .map(|m| m.iter().cloned().collect())
            .unwrap_or_default();
        members.sort();
        members
    }

    #[test]
    fn groups_follow_their_members() {
        let registry = Registry::default();
        let _a = registry.insert_test(&rec("a", "ann"), 1024, 8);
        let _b = registry.insert_test(&rec("b", "bob"), 1024, 8);
        assert_eq!(registry.join(&id("a"), "room"), Joined::Now);
        assert_eq!(registry.join(&id("b"), "room"), Joined::Now);
        assert_eq!(
            registry.join(&id("b"), "room"),
            Joined::Already,
            "joining twice is harmless"
        );
        assert_eq!(
            registry.join(&id("zz"), "room"),
            Joined::NotLocal,
            "unknown connections cannot join"
        );
        assert_eq!(members(&registry, "room"), [id("a"), id("b")]);
        assert_eq!(
            registry.remove(&id("a")),
            Some(vec![Arc::<str>::from("room")])
        );
        assert_eq!(members(&registry, "room"), [id("b")]);
        assert!(registry.leave(&id("b"), "room"));
        assert!(members(&registry, "room").is_empty());
        assert!(registry.groups.is_empty(), "empty groups are deleted");
    }

    #[test]
    fn a_join_racing_a_removal_leaves_no_dangling_member() {
        // A join that put the group into the connection's list, let go of the connection and
        // only then added the member could be overtaken by a removal in between, leaving a
        // member no removal would ever take out.
        let registry = Registry::default();
        for round in 0..2000 {
            let conn = format!("c{round}");
            let _mailbox = registry
                .insert_test(&rec(&conn, "ann"), 1024, 8)
                .expect("room");
            std::thread::scope(|s| {
                s.spawn(|| {
                    let _ = registry.join(&id(&conn), "room");
                });
                s.spawn(|| {
                    let _ = registry.remove(&id(&conn));
                });
            });
            assert!(
                members(&registry, "room").is_empty(),
                "round {round}: a removed connection stayed a member"
            );
        }
    }

    #[test]
    fn users_are_indexed_apart_from_groups() {
        let registry = Registry::default();
        let bob = registry
            .insert_test(&rec("b1", "bob"), 1024, 8)
            .expect("room");
        let _eve = registry.insert_test(&rec("e1", "eve"), 1024, 8);
        // Whatever name a client picks for a group, it is only a group.
        for name in ["\u{0}user:bob", "user:bob", "bob"] {
            assert_eq!(registry.join(&id("e1"), name), Joined::Now);
        }
        let record = Utf8Bytes::from_static("{}\u{1e}");
        let mut fanout = Fanout::default();
        registry.offer_user(&user("bob"), &record, &mut fanout);
        assert_eq!(fanout.queued, 1);
        assert_eq!(bob.pop().as_deref(), Some("{}\u{1e}"));
        for name in ["\u{0}user:bob", "user:bob", "bob"] {
            assert_eq!(members(&registry, name), [id("e1")]);
        }
        assert_eq!(registry.user_connections(&user("bob")), 1);
        let _ = registry.remove(&id("b1"));
        assert_eq!(registry.user_connections(&user("bob")), 0);
        assert!(
            !registry.users.contains_key(&user("bob")),
            "users without connections are dropped"
        );
    }

    #[test]
    fn a_user_holds_at_most_the_allowed_connections() {
        let registry = Registry::default();
        assert!(registry.insert_test(&rec("a1", "ann"), 1024, 2).is_ok());
        assert!(registry.insert_test(&rec("a2", "ann"), 1024, 2).is_ok());
        assert_eq!(
            registry.insert_test(&rec("a3", "ann"), 1024, 2).err(),
            Some(TooManyConnections { limit: 2 })
        );
        assert!(registry.insert_test(&rec("b1", "bob"), 1024, 2).is_ok());
        let _ = registry.remove(&id("a1"));
        assert!(registry.insert_test(&rec("a3", "ann"), 1024, 2).is_ok());
        assert_eq!(registry.len(), 3);
    }

    #[test]
    fn a_removed_connection_is_gone_for_senders() {
        let registry = Registry::default();
        let mailbox = registry
            .insert_test(&rec("a", "ann"), 1024, 8)
            .expect("room");
        let _ = registry.remove(&id("a"));
        assert_eq!(mailbox.closing(), Some(Closing::Gone));
        let mut fanout = Fanout::default();
        registry.offer(&[id("a")], &Utf8Bytes::from_static("x"), &mut fanout);
        assert_eq!((fanout.queued, fanout.not_reading), (0, 0));
    }
}
