//! What a store can do, as data.
//!
//! Each store instance answers [`ConnectionStore::capabilities`](crate::ConnectionStore) with one
//! [`Capabilities`] value. Its fields are the columns of the classic comparison of user-mapping
//! strategies (more than one server, list connected users, survives restarts, speed) plus how
//! records orphaned by a crashed node are cleaned up and whether the store has node leases. The
//! conformance suite checks every claim against behaviour, and the README's capability table is
//! rendered from these values.

use std::fmt::Write as _;

/// Whether, and at what cost, a store can list the connected users.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum UserListing {
    /// The store cannot list users (for example: membership lives in per-node hub groups).
    /// [`ConnectionStore::users`](crate::ConnectionStore::users) and `counts` return
    /// [`StoreError::Unsupported`](crate::StoreError::Unsupported).
    Unsupported,
    /// Listing visits every user on each page: fine for admin pages, not for hot paths.
    FullScan,
    /// Listing walks an ordered index: each page costs about its own size.
    Indexed,
}

/// How fast a store answers, in orders of magnitude.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Speed {
    /// In-process data structures: well under a microsecond per operation, and no operation
    /// ever waits (each completes on its first poll).
    InProcess,
    /// A network round trip to an external service per operation that misses any cache. While
    /// the service cannot be reached, operations fail with transient errors, in bounded time.
    Network,
}

/// How records orphaned by a node that stopped without cleaning up get removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum OrphanCleanup {
    /// Records outlive the node that wrote them (a database, a table service): each node
    /// renews a lease with [`heartbeat`](crate::ConnectionStore::heartbeat), and any node's
    /// [`sweep`](crate::ConnectionStore::sweep) removes the connections of nodes whose lease
    /// expired. Requires [`Capabilities::leases`].
    LeaseSweep,
    /// Records live in the memory of the process that holds the sockets (the in-memory map,
    /// or per-node hub groups), so they vanish with it: a crash leaves nothing behind.
    DiesWithNode,
}

/// What a store instance can do. One value per store instance; the conformance suite holds the
/// store to every claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Capabilities {
    /// Short name of the strategy, as given to `--store` (`memory`, `groups`, `sql`, `azure`).
    pub strategy: &'static str,
    /// Several server nodes can share the store and see each other's connections: instances
    /// opened on the same data (a database, a table) by different processes see the same
    /// records. When `false`, every instance holds its own records.
    pub shared_across_nodes: bool,
    /// Several nodes serve users together when a backplane connects them, although every
    /// instance holds its own records: the group-per-user strategy, where a message to a user
    /// travels on the user's channel to every node holding one of the user's connections.
    /// Never together with `shared_across_nodes` or `lookup`. A server refuses a backplane
    /// for a store that neither shares its records nor spans nodes this way (the in-memory
    /// map: other nodes' users would never be found).
    pub spans_nodes_with_backplane: bool,
    /// [`connections`](crate::ConnectionStore::connections) answers for a user. When `false`,
    /// it returns `Unsupported` and the server delivers to users through per-user groups.
    pub lookup: bool,
    /// Whether and how connected users can be listed (and counted).
    pub list_users: UserListing,
    /// Records survive a restart of the server process (and of the store itself): a new
    /// instance opened on the same data finds them. Never with
    /// [`OrphanCleanup::DiesWithNode`].
    pub survives_restart: bool,
    /// How fast operations are, and whether they ever wait; see [`Speed`].
    pub speed: Speed,
    /// How orphaned records are cleaned up.
    pub orphan_cleanup: OrphanCleanup,
    /// [`heartbeat`](crate::ConnectionStore::heartbeat), [`sweep`](crate::ConnectionStore::sweep)
    /// and [`release`](crate::ConnectionStore::release) work, and lookups ignore records of
    /// nodes whose lease expired. Required by [`OrphanCleanup::LeaseSweep`]; an in-memory
    /// store may offer leases too, so that several nodes in one process behave like nodes
    /// sharing a database.
    pub leases: bool,
}

impl Capabilities {
    /// Whether [`users`](crate::ConnectionStore::users) and
    /// [`counts`](crate::ConnectionStore::counts) are supported.
    pub fn can_list_users(&self) -> bool {
        self.list_users != UserListing::Unsupported
    }

    /// Whether [`heartbeat`](crate::ConnectionStore::heartbeat),
    /// [`sweep`](crate::ConnectionStore::sweep) and
    /// [`release`](crate::ConnectionStore::release) are supported (the same as
    /// [`Capabilities::leases`]).
    pub fn has_leases(&self) -> bool {
        self.leases
    }

    /// Whether several nodes can serve users together with this store (given a backplane).
    pub fn spans_nodes(&self) -> bool {
        self.shared_across_nodes || self.spans_nodes_with_backplane
    }

    /// Renders a Markdown table with one row per store, the columns of the classic comparison.
    pub fn markdown_table(stores: &[Capabilities]) -> String {
        let mut out = String::from(
            "| store | more than one server | look up a user's connections | list connected users | survives restarts | speed | orphaned records |\n\
             |---|---|---|---|---|---|---|\n",
        );
        for c in stores {
            let yes_no = |b: bool| if b { "yes" } else { "no" };
            let servers = if c.shared_across_nodes {
                "yes"
            } else if c.spans_nodes_with_backplane {
                "yes (with a backplane)"
            } else {
                "no"
            };
            let listing = match c.list_users {
                UserListing::Unsupported => "no",
                UserListing::FullScan => "yes (full scan per page)",
                UserListing::Indexed => "yes (indexed pages)",
            };
            let speed = match c.speed {
                Speed::InProcess => "in-process",
                Speed::Network => "network round trip",
            };
            let orphans = match c.orphan_cleanup {
                OrphanCleanup::LeaseSweep => "node leases + sweep",
                OrphanCleanup::DiesWithNode => "vanish with their node",
            };
            let _ = writeln!(
                out,
                "| `{}` | {} | {} | {} | {} | {} | {} |",
                c.strategy,
                servers,
                yes_no(c.lookup),
                listing,
                yes_no(c.survives_restart),
                speed,
                orphans
            );
        }
        out
    }
}
