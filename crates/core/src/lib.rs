//! # switchboard-core
//!
//! The vocabulary every Switchboard crate speaks: identifiers ([`UserId`], [`ConnectionId`],
//! [`NodeId`]), the [`ConnectionRecord`], the [`ConnectionStore`] trait with its
//! [`Capabilities`], and the one error type [`StoreError`]. With the `testkit` feature it also
//! carries the conformance suite every store must pass.
//!
//! Backends depend on this crate only; the server depends on this crate and on the backends it
//! was built with.
//!
//! ## Three pieces, kept apart
//!
//! Knowing "which user is behind which connection" and delivering "a message to user X" involve
//! three different things, and Switchboard keeps them in three different places:
//!
//! | piece | question it answers | where it lives |
//! |---|---|---|
//! | **store** ([`ConnectionStore`]) | which connections does user X have, on which node? | this trait; one crate per strategy |
//! | **backplane** ([`Backplane`]) | how does a message reach a socket held by *another* node? | pub/sub between nodes (Redis) |
//! | **local registry** | which sockets does *this* node hold, and how do I write to one? | the server, in memory |
//!
//! To deliver to user X a node asks the store for X's connections, writes directly to those it
//! holds itself (local registry) and hands the rest to the backplane, addressed to the node that
//! holds them. With the `groups` strategy the store cannot look users up
//! ([`Capabilities::lookup`] is `false`): membership lives in per-user groups of the hub
//! framework, and delivery goes to the group on every node through the backplane.
//!
//! The store only keeps state. It never holds sockets and never delivers anything, so a store
//! can be shared by many nodes, survive restarts, or live in another process entirely.
//!
//! ## Orphans
//!
//! A node that crashes cannot remove its connections. Where that leaves records behind is a
//! property of the store, [`Capabilities::orphan_cleanup`]:
//!
//! * [`OrphanCleanup::DiesWithNode`]: the records live in the memory of the process that holds
//!   the sockets (the in-memory map, per-node hub groups), so a crash leaves nothing behind.
//! * [`OrphanCleanup::LeaseSweep`]: the records outlive their node (a database, a table
//!   service). Every record names its node, and each node holds a lease it renews with
//!   [`ConnectionStore::heartbeat`]; any node's [`ConnectionStore::sweep`] removes the
//!   connections of nodes whose lease ran out, and a node that stops cleanly ends its lease
//!   with [`ConnectionStore::release`].
//!
//! Leases are measured by the store's clock, never the nodes', so nodes need not agree on the
//! time. [`Capabilities::leases`] says whether a store has them; `LeaseSweep` requires them,
//! and in-memory stores offer them too, so several nodes in one process behave like nodes
//! sharing a database. As soon as a node's lease expires, lookups
//! ([`ConnectionStore::connections`], [`ConnectionStore::users`], [`ConnectionStore::counts`])
//! ignore its records, without waiting for a sweep; a node that renews in time (its
//! [`Lease`] answer says `Lapsed` when it did not) is visible again. Records of a node that
//! never took a lease stay visible until a sweep removes them.
//!
//! ## Features
//!
//! | feature | description | default |
//! |---|---|---|
//! | `testkit` | the conformance suites: stores ([`testkit`] module, [`conformance_tests!`] macro) and backplanes ([`backplane_conformance_tests!`] macro, the in-memory `testkit::MemoryBus`) | no |

#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod backplane;
pub mod capabilities;
pub mod error;
pub mod id;
pub mod record;
pub mod store;

#[cfg(feature = "testkit")]
pub mod testkit;

pub use backplane::{
    Address, Backplane, BackplaneCapabilities, BackplaneError, ChannelNames, DeliveryClass, Health,
    Inbox, Message, MessageId, Reach,
};
pub use capabilities::{Capabilities, OrphanCleanup, Speed, UserListing};
pub use error::{BoxError, StoreError};
pub use id::{ConnectionId, InvalidId, NodeId, UserId};
pub use record::ConnectionRecord;
pub use store::{ConnectionStore, Counts, Lease, PageRequest, Removal, UserPage};

/// Re-exported so stores implement [`ConnectionStore`] with the same macro version.
pub use async_trait::async_trait;
