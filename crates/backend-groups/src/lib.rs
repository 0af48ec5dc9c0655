//! # switchboard-groups
//!
//! [`GroupStore`]: the classic "one group per user" strategy, done honestly.
//!
//! In the classic guidance every connection joins a group named after its user when it
//! connects, the framework takes it out of the group when it disconnects (hub code never has
//! to), and sending to a user is sending to that group. The framework keeps the groups on the
//! node that holds the sockets, so:
//!
//! * **no lookup, no listing**: nobody can ask which connections a user has, or who is
//!   online. [`ConnectionStore::connections`], `users` and `counts` answer
//!   [`StoreError::Unsupported`](switchboard_core::StoreError::Unsupported), and the
//!   capabilities say so up front;
//! * **several servers through a backplane**: each node holds its own members; a message to a
//!   user travels on the user's channel of the backplane to every node that holds one of the
//!   user's connections (the server subscribes a node to the channel on the user's first
//!   connection there and unsubscribes after the last). Without a backplane it serves one
//!   node;
//! * **nothing survives a restart, and nothing is orphaned**: the groups live in the serving
//!   process and vanish with it.
//!
//! What the store itself keeps is each node's membership (user → that user's connections on
//! this node), so that connecting twice is a conflict and disconnecting answers truthfully.
//! Delivery is the server's: its per-user index and the user channels.

use async_trait::async_trait;
use dashmap::DashMap;
use switchboard_core::{
    Capabilities, ConnectionId, ConnectionRecord, ConnectionStore, OrphanCleanup, Removal, Speed,
    StoreError, UserId, UserListing,
};

/// The group-per-user store. See the [crate docs](crate).
#[derive(Debug, Default)]
pub struct GroupStore {
    /// user → the ids of that user's connections on this node (the user's group).
    groups: DashMap<UserId, Vec<ConnectionId>>,
}

impl GroupStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// The capabilities of every `GroupStore`.
    pub const CAPABILITIES: Capabilities = Capabilities {
        strategy: "groups",
        shared_across_nodes: false,
        spans_nodes_with_backplane: true,
        lookup: false,
        list_users: UserListing::Unsupported,
        survives_restart: false,
        speed: Speed::InProcess,
        orphan_cleanup: OrphanCleanup::DiesWithNode,
        leases: false,
    };
}

#[async_trait]
impl ConnectionStore for GroupStore {
    fn capabilities(&self) -> Capabilities {
        Self::CAPABILITIES
    }

    async fn add(&self, record: ConnectionRecord) -> Result<(), StoreError> {
        let mut group = self.groups.entry(record.user().clone()).or_default();
        if group.contains(record.id()) {
            return Err(StoreError::Conflict {
                user: record.user().clone(),
                id: record.id().clone(),
            });
        }
        group.push(record.id().clone());
        Ok(())
    }

    async fn remove(&self, user: &UserId, id: &ConnectionId) -> Result<Removal, StoreError> {
        let mut removed = false;
        // One shard lock: leave the group, and drop the group with its last member.
        self.groups.remove_if_mut(user, |_, group| {
            if let Some(i) = group.iter().position(|c| c == id) {
                group.swap_remove(i);
                removed = true;
            }
            group.is_empty()
        });
        Ok(if removed {
            Removal::Removed
        } else {
            Removal::NotFound
        })
    }

    async fn reconnect(&self, record: ConnectionRecord) -> Result<(), StoreError> {
        let mut group = self.groups.entry(record.user().clone()).or_default();
        if !group.contains(record.id()) {
            group.push(record.id().clone());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchboard_core::testkit::{conn, ready, record, user};

    #[test]
    fn groups_follow_their_members_and_answer_nothing_else() {
        let store = GroupStore::new();
        ready(store.add(record("c1", "ann", "n"))).expect("added");
        ready(store.add(record("c2", "ann", "n"))).expect("added");
        assert!(matches!(
            ready(store.add(record("c1", "ann", "n"))),
            Err(StoreError::Conflict { .. })
        ));
        assert_eq!(
            ready(store.remove(&user("ann"), &conn("c1"))).expect("removed"),
            Removal::Removed
        );
        assert_eq!(
            ready(store.remove(&user("bob"), &conn("c2"))).expect("answered"),
            Removal::NotFound,
            "not bob's connection"
        );
        assert_eq!(
            ready(store.remove(&user("ann"), &conn("c2"))).expect("removed"),
            Removal::Removed
        );
        assert!(store.groups.is_empty(), "a group goes with its last member");
        let err = ready(store.connections(&user("ann"))).expect_err("no lookup");
        assert!(err.is_unsupported());
        assert!(
            ready(store.counts())
                .expect_err("no listing")
                .is_unsupported()
        );
    }
}
