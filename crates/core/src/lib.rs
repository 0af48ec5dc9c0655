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
//! A node that crashes cannot remove its connections. Stores shared across nodes therefore
//! record the node of every connection and give each node a lease it renews with
//! [`ConnectionStore::heartbeat`]; any node's [`ConnectionStore::sweep`] removes the connections
//! of nodes whose lease ran out. [`Capabilities::orphan_cleanup`] says which scheme a store uses.
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
    Inbox, Message, MessageId,
};
pub use capabilities::{Capabilities, OrphanCleanup, Speed, UserListing};
pub use error::{BoxError, StoreError};
pub use id::{ConnectionId, InvalidId, NodeId, UserId};
pub use record::ConnectionRecord;
pub use store::{ConnectionStore, Counts, Lease, PageRequest, Removal, UserPage};

/// Re-exported so stores implement [`ConnectionStore`] with the same macro version.
pub use async_trait::async_trait;
