//! Delivery on this node: resolve a target to connections and queue one shared record for each.

use std::sync::Arc;

use axum::extract::ws::Utf8Bytes;
use switchboard_core::{Capabilities, ConnectionId, ConnectionStore, NodeId, UserId};

use crate::hub::{Delivery, HubError, Target};
use crate::registry::{Registry, Sent};

/// What every session and hub method of one hub shares.
#[derive(Debug)]
pub(crate) struct Core {
    pub(crate) store: Arc<dyn ConnectionStore>,
    pub(crate) capabilities: Capabilities,
    pub(crate) registry: Registry,
    pub(crate) node: NodeId,
}

/// The local group that stands for a user when the store cannot look users up (the `groups`
/// strategy). The leading NUL keeps it apart from any group a hub names.
pub(crate) fn user_group(user: &UserId) -> String {
    format!("\u{0}user:{user}")
}

impl Core {
    pub(crate) fn new(store: Arc<dyn ConnectionStore>, node: NodeId) -> Self {
        Self {
            capabilities: store.capabilities(),
            store,
            registry: Registry::default(),
            node,
        }
    }

    /// Queues `record` for every connection of `target`, exactly once each.
    pub(crate) async fn deliver(
        &self,
        target: &Target,
        record: String,
    ) -> Result<Delivery, HubError> {
        let out = Utf8Bytes::from(record);
        let connections = match target {
            Target::Connection(id) => self.send_each(std::iter::once(id), &out),
            Target::User(user) if self.capabilities.lookup => {
                let records = self.store.connections(user).await?;
                let mut remote = 0usize;
                let local = records.iter().filter_map(|r| {
                    if r.node() == &self.node {
                        Some(r.id())
                    } else {
                        remote += 1;
                        None
                    }
                });
                let sent = self.send_each(local, &out);
                if remote > 0 {
                    tracing::warn!(
                        user = %user,
                        remote,
                        "connections on other nodes were not reached: no backplane is configured"
                    );
                }
                sent
            }
            Target::User(user) => {
                self.send_each(self.registry.group_members(&user_group(user)).iter(), &out)
            }
            Target::Group(group) => self.send_each(self.registry.group_members(group).iter(), &out),
            Target::All => self.send_each(self.registry.all().iter(), &out),
        };
        Ok(Delivery { connections })
    }

    fn send_each<'a>(&self, ids: impl Iterator<Item = &'a ConnectionId>, out: &Utf8Bytes) -> usize {
        ids.filter(|id| match self.registry.send(id, out) {
            Sent::Queued => true,
            Sent::Gone => false,
            Sent::Overflow => {
                tracing::warn!(connection = %id, "send queue full: closing the connection");
                false
            }
        })
        .count()
    }
}
