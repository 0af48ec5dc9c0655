//! Reference-counted backplane subscriptions: a node subscribes to a user's or a group's
//! channel when its first local member arrives and unsubscribes after the last one left.
//!
//! Counting happens here, not in the backplane (whose subscribe/unsubscribe are idempotent
//! set operations). Each address has its own lock around the backplane calls, so the calls for
//! one address happen in order and the subscription always ends up matching the count, while
//! different addresses never wait for each other.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use switchboard_core::{Address, Backplane, BackplaneError};

/// One address: how many local members want it, and whether the backplane has it.
#[derive(Debug, Default)]
struct Slot {
    /// Local members. Changed only under the map lock.
    members: usize,
    /// Whether the backplane holds the subscription. Held across the backplane calls.
    subscribed: Arc<tokio::sync::Mutex<bool>>,
}

/// This node's channel subscriptions.
#[derive(Debug, Default)]
pub(crate) struct Subscriptions {
    slots: Mutex<HashMap<Address, Slot>>,
}

impl Subscriptions {
    fn slots(&self) -> MutexGuard<'_, HashMap<Address, Slot>> {
        // The map holds plain counters; a panic elsewhere cannot leave it inconsistent.
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts one more local member of `address`, subscribing when it is the first.
    ///
    /// # Errors
    ///
    /// The backplane's, when subscribing failed; the member is then not counted.
    pub(crate) async fn acquire(
        &self,
        backplane: &dyn Backplane,
        address: &Address,
    ) -> Result<(), BackplaneError> {
        let lock = {
            let mut slots = self.slots();
            let slot = slots.entry(address.clone()).or_default();
            slot.members += 1;
            slot.subscribed.clone()
        };
        if let Err(e) = self.settle(backplane, address, &lock).await {
            self.count_out(address);
            self.forget_if_idle(address);
            return Err(e);
        }
        Ok(())
    }

    /// Counts one local member of `address` out, unsubscribing after the last. An
    /// unsubscribe that fails leaves the subscription in place (this node then receives
    /// messages it has nobody for, and drops them); the next change retries.
    pub(crate) async fn release(&self, backplane: &dyn Backplane, address: &Address) {
        let Some(lock) = self.count_out(address) else {
            return;
        };
        if let Err(e) = self.settle(backplane, address, &lock).await {
            tracing::debug!(error = %e, %address, "could not unsubscribe");
        }
        self.forget_if_idle(address);
    }

    /// Takes one member off the count; returns the slot's lock, or `None` for an unknown
    /// address.
    fn count_out(&self, address: &Address) -> Option<Arc<tokio::sync::Mutex<bool>>> {
        let mut slots = self.slots();
        let slot = slots.get_mut(address)?;
        slot.members = slot.members.saturating_sub(1);
        Some(slot.subscribed.clone())
    }

    /// Subscribes or unsubscribes so that the backplane matches the count.
    async fn settle(
        &self,
        backplane: &dyn Backplane,
        address: &Address,
        lock: &tokio::sync::Mutex<bool>,
    ) -> Result<(), BackplaneError> {
        let mut subscribed = lock.lock().await;
        let wanted = self.members(address) > 0;
        if wanted && !*subscribed {
            backplane.subscribe(address).await?;
            *subscribed = true;
        } else if !wanted && *subscribed {
            backplane.unsubscribe(address).await?;
            *subscribed = false;
        }
        Ok(())
    }

    /// Drops the slot of an address nobody wants and the backplane does not hold.
    fn forget_if_idle(&self, address: &Address) {
        let mut slots = self.slots();
        let idle = slots.get(address).is_some_and(|slot| {
            slot.members == 0 && slot.subscribed.try_lock().is_ok_and(|held| !*held)
        });
        if idle {
            slots.remove(address);
        }
    }

    fn members(&self, address: &Address) -> usize {
        self.slots().get(address).map_or(0, |slot| slot.members)
    }
}
