//! Delivery on this node: resolve a target to connections and queue one shared record for each.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::Utf8Bytes;
use switchboard_core::{Capabilities, ConnectionStore, NodeId};

use crate::hub::{Delivery, HubError, Target};
use crate::registry::{Fanout, Registry};
use crate::throttle::Throttle;

/// Log lines about connections closed for not reading: a client decides how often that happens.
static NOT_READING: Throttle = Throttle::new(10, Duration::from_secs(10));

/// Log lines about connections on other nodes that could not be reached.
static UNREACHABLE: Throttle = Throttle::new(1, Duration::from_secs(10));

/// What every session and hub method of one hub shares.
#[derive(Debug)]
pub(crate) struct Core {
    pub(crate) store: Arc<dyn ConnectionStore>,
    pub(crate) capabilities: Capabilities,
    pub(crate) registry: Registry,
    pub(crate) node: NodeId,
    /// How long a send waits for room in a full queue before the recipient counts as not
    /// reading.
    pub(crate) send_timeout: Duration,
}

impl Core {
    pub(crate) fn new(
        store: Arc<dyn ConnectionStore>,
        node: NodeId,
        send_timeout: Duration,
    ) -> Self {
        Self {
            capabilities: store.capabilities(),
            store,
            registry: Registry::default(),
            node,
            send_timeout,
        }
    }

    /// Queues `record` for every connection of `target`, exactly once each. Full queues are
    /// waited for (up to the send timeout): the sender is slowed down, never its target.
    pub(crate) async fn deliver(
        &self,
        target: &Target,
        record: String,
    ) -> Result<Delivery, HubError> {
        let out = Utf8Bytes::from(record);
        let mut fanout = Fanout::default();
        match target {
            Target::Connection(id) => self.registry.offer(std::iter::once(id), &out, &mut fanout),
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
                self.registry.offer(local, &out, &mut fanout);
                if remote > 0
                    && let Some(suppressed) = UNREACHABLE.allow()
                {
                    tracing::warn!(
                        user = %user,
                        remote,
                        suppressed,
                        "connections on other nodes were not reached: no backplane is configured"
                    );
                }
            }
            Target::User(user) => self.registry.offer_user(user, &out, &mut fanout),
            Target::Group(group) => self.registry.offer_group(group, &out, &mut fanout),
            Target::All => self.registry.offer_all(&out, &mut fanout),
        }
        let closed = fanout.finish(&out, self.send_timeout).await;
        if closed > 0
            && let Some(suppressed) = NOT_READING.allow()
        {
            tracing::warn!(
                connections = closed,
                suppressed,
                wait = ?self.send_timeout,
                "closing connections that do not read their messages: their queue stayed full"
            );
        }
        Ok(Delivery {
            connections: fanout.queued,
            not_reading: fanout.not_reading,
        })
    }
}
