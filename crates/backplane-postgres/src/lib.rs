//! # switchboard-postgres
//!
//! A [`Backplane`](switchboard_core::Backplane) over PostgreSQL: one node or many, messages
//! survive a listener reconnect and a PostgreSQL restart within a retention bound.
//!
//! ## Design: LISTEN/NOTIFY is a doorbell, the table is the bus
//!
//! NOTIFY payloads are limited to 8000 bytes, channel names to 63 bytes, notifications are
//! lost while a listener reconnects, and every transaction that notifies serializes on a
//! cluster-wide lock at commit. So messages never travel in a notification:
//!
//! * **Tables** (in the configured schema, created if missing, by embedded migrations):
//!   `nodes(node, alive_until)` — presence, renewed every third of the presence TTL on the
//!   database's clock; `subscriptions(channel, node)`; `inbox(seq, target, writer, wseq,
//!   created_at, payload)` — one row per target node, `payload` = [`Message::encode`].
//! * **Publish** inserts one row per live target node (the node itself for
//!   [`Address::Node`], every live subscriber for a channel) and the number of rows is the
//!   [`Reach`]. In the same transaction, `pg_notify` rings each target's doorbell: channel
//!   `sb_` + 40 hex digits of SHA-256 over schema and node id (43 bytes), empty payload.
//!   NOTIFY is sent only by this backplane's own transactions.
//! * **Receive without gaps**: `bigserial` values can commit out of order, so reading
//!   "seq > last seen" could skip a row that commits late. Instead the receiver consumes its
//!   rows: `DELETE FROM inbox WHERE target = me … RETURNING`, sorted by `seq`. Whatever is
//!   committed is taken, whatever commits later is taken next time, so nothing is skipped.
//!   Order per sender holds because each node publishes through one writer that commits its
//!   transactions one after another, so a later row of that sender always has a higher `seq`
//!   than every earlier one still present.
//!   The rows are deleted in a transaction that commits after they were handed to the inbox,
//!   so a link lost in between leaves them in place, and the copies read again are dropped.
//! * **Catch-up and poll**: the receiver drains at start, after every reconnect of its
//!   listener, on every notification, and every poll interval, so a lost notification only
//!   delays a message.
//! * **Exactly once**: a batch whose commit outcome is unknown (the link died during
//!   COMMIT) is written again; every row carries its writer's token and outbox number
//!   (`writer`, `wseq`), and the receiver drops numbers it has already seen from that writer.
//! * **Outbox**: publications and subscription changes wait in a bounded queue (messages,
//!   bytes, age); the writer flushes them in order, in batches, one transaction per batch.
//!   While PostgreSQL is down they wait; past a bound, calls fail with
//!   [`BackplaneError::Backlogged`](switchboard_core::BackplaneError::Backlogged)
//!   (transient).
//! * **Expiry**: rows older than the retention are deleted; a node whose presence lapsed
//!   more than one TTL ago loses its presence, subscriptions and rows. A node that finds its
//!   presence row gone writes its subscriptions again.
//!
//! [`Message::encode`]: switchboard_core::Message::encode
//! [`Address::Node`]: switchboard_core::Address::Node
//! [`Reach`]: switchboard_core::Reach

mod backplane;
mod config;

pub use backplane::PostgresBackplane;
pub use config::PostgresConfig;
