//! A [`Backplane`](switchboard_core::Backplane) over Redis Streams.
//!
//! Every node reads its own inbox stream; a message goes only to the nodes that need it,
//! never to every node. One writer task per endpoint sends what the node publishes, in
//! order, through a bounded outbox that rides out outages.
//!
//! # Key layout
//!
//! Every name comes from [`ChannelNames`](switchboard_core::ChannelNames) (prefix `p`,
//! names percent-encoded, so no user or group name can act as a pattern, a hash tag or a
//! separator):
//!
//! | key                         | type   | what                                                  |
//! |-----------------------------|--------|-------------------------------------------------------|
//! | `p:node:{id}`               | stream | the node's inbox; entries `m` (the [`Message`](switchboard_core::Message) encoding), `w` (writer token), `n` (writer sequence) |
//! | `p:node:{id}:alive`         | string | exists while the node runs; lifetime `alive_ttl`, refreshed every third of it |
//! | `p:user:{name}:members`     | set    | inbox names of the nodes subscribed to the user        |
//! | `p:group:{name}:members`    | set    | inbox names of the nodes subscribed to the group       |
//! | `p:all:members`             | set    | inbox names of the nodes subscribed to the hub channel |
//! | `p:epoch`                   | string | a random value set once (`SET NX`); a different or missing value after a reconnect means Redis lost its data |
//!
//! A message to a node is one script call: `XADD p:node:{id} MAXLEN ~ stream_max_len * …`
//! if the node's alive key exists (reach 1), nothing otherwise (reach 0). A message to a
//! channel is one script call that appends it to the inbox of every member whose alive key
//! exists, removes members whose alive key is gone (crashed nodes) and answers how many
//! inboxes it wrote. A node reads its inbox with `XREAD COUNT … BLOCK …` on a connection of
//! its own, and trims what it has handed over with `XTRIM … MINID`. Commands are sent with
//! literal key names only: no `KEYS`, no patterns. The scripts touch keys they compute from
//! the members sets, so this needs one Redis primary (not Redis Cluster).
//!
//! # Guarantees
//!
//! * [`DeliveryClass::Resumable`](switchboard_core::DeliveryClass::Resumable): a node that
//!   loses its link resumes from the last entry it read, so nothing written to its inbox
//!   while it was away is missed (within `stream_max_len` entries).
//! * [`Ordering::PerSender`](switchboard_core::backplane::Ordering::PerSender): one writer per
//!   endpoint sends in publish order and resends a failed batch in order; a receiver drops
//!   the duplicates a resent batch can write (by writer token and writer sequence), so a
//!   message reaches an inbox once.
//! * `publish` answers how many nodes the message was written for.
//!
//! # Outages
//!
//! While Redis is unreachable, publications and subscription changes wait in the outbox,
//! bounded by `buffer_messages`, `buffer_bytes` and `buffer_age`: a call that finds the outbox
//! full fails at once with [`BackplaneError::Backlogged`](switchboard_core::BackplaneError::Backlogged);
//! one still waiting after `buffer_age` fails with `Backlogged` too. Both are transient, and
//! nothing is dropped without its caller being told. Each link reconnects with exponential
//! backoff (100 ms doubling to 1 s, with jitter). The first link to fail logs one warning;
//! one info follows when both are back. [`health`](switchboard_core::Backplane::health) is
//! down while either link is. After every reconnect the writer registers the node again
//! (alive key and every membership it holds) before it sends anything. A command that takes
//! longer than `command_timeout` counts as a lost link, so a slow Redis bounds a publication
//! to about `buffer_age + command_timeout`.
//!
//! # URLs
//!
//! `redis://host:port/db`, `redis://user:password@host:port/db` (`AUTH` with a user, or
//! `redis://:password@…` for the default user) and `rediss://…` for TLS (rustls with the
//! `ring` provider; the system's roots unless
//! [`RedisConfig::with_tls_root_certificate`] names a private CA).
//!
//! `start` tries to connect once. If Redis refuses the credentials in the URL, `start` fails
//! with a permanent [`BackplaneError::Backend`](switchboard_core::BackplaneError::Backend).
//! If Redis cannot be reached, `start` succeeds and the links connect in the background,
//! health down until they do: a node can boot before its Redis.
//!
//! # Restart without persistence
//!
//! A Redis restarted without its data has lost the inboxes, member sets and alive keys. The
//! epoch key tells: after a reconnect the writer registers again and then waits a settle
//! period (the longest reconnect delay, 1 s, plus 1 s) before sending the outbox, so the other
//! nodes have registered again too, keeping its alive key fresh meanwhile; the reader reads
//! its recreated inbox from the start. Entries written to an inbox but not yet read when Redis
//! lost them are not lost either: every writer keeps what it published in the last 2 s and
//! writes it again after the settle period, with the same writer sequence numbers, so a
//! receiver drops the copies it had already read. What can still be lost:
//!
//! * publications older than those 2 s that their receiver had not read when Redis lost its
//!   data (a receiver that was far behind);
//! * messages for a node that takes longer than the settle period to register again (they
//!   find no alive key or no membership: reach 0 or fewer nodes);
//! * publications that waited longer than `buffer_age` (their callers got `Backlogged`).
//!
//! Outside restarts: entries trimmed by `MAXLEN ~ stream_max_len` while their node was not
//! reading, and messages to a node whose alive key expired (its writer away for longer than
//! `alive_ttl`) until it registers again.
//!
//! The other way round, a failure is not always a loss: a publication that was sent but whose
//! answer did not come back within `command_timeout`, and that then waited past `buffer_age`,
//! fails with `Backlogged` although Redis may have written it. Within `buffer_age` it is sent
//! again, and receivers drop the copy.

mod backplane;
mod config;
#[cfg(feature = "testing")]
pub mod testing;

pub use backplane::RedisBackplane;
pub use config::RedisConfig;

/// A configuration [`RedisBackplane::new`] refuses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RedisBackplaneError {
    /// The URL does not parse, or needs something this build lacks.
    #[error("invalid Redis URL: {reason}")]
    InvalidUrl {
        /// Why, in words.
        reason: String,
    },
    /// A bound that must be positive is zero.
    #[error("the Redis backplane setting `{setting}` must be positive")]
    InvalidConfig {
        /// The setting's name.
        setting: &'static str,
    },
}
