//! Tunables of a hub, with the defaults of the reference SignalR server where one exists.

use std::time::Duration;

/// Options of a hub service. Build with [`HubOptions::default`] and the `with_*` setters.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct HubOptions {
    /// Send a Ping after this much send-silence. Default 15 s.
    pub keep_alive_interval: Duration,
    /// Close a connection that sent nothing (not even a Ping) for this long. Default 30 s.
    pub client_timeout: Duration,
    /// Close a connection whose handshake has not arrived after this long. Default 15 s.
    pub handshake_timeout: Duration,
    /// Largest accepted record, in bytes. Default 32 KiB.
    pub max_record_size: usize,
    /// Bytes of records queued per connection for its socket (each record also costs 64
    /// bytes of bookkeeping). A send to a full queue waits for room. Default 1 MiB.
    pub send_queue_size: usize,
    /// How long a send waits for room in a full queue. When it waited that long, the
    /// recipient does not keep up: it is closed, and the sender is told the message could not
    /// be delivered because the recipient is not reading. Default 5 s.
    pub send_timeout: Duration,
    /// Invocations a connection may start per second, on average; a connection that invokes
    /// faster is slowed down (its further records wait; nothing is refused or dropped). `0`
    /// turns the limit off. Default 500.
    pub max_invocations_per_second: u32,
    /// Invocations a connection may start at once above the average rate. Default 500.
    pub invocation_burst: u32,
    /// Invocations of one connection that may run at the same time; further records wait
    /// until one completes (as ASP.NET Core's `MaximumParallelInvocationsPerClient`).
    /// Default 1.
    pub max_parallel_invocations: usize,
    /// Live connections one user may hold on this node (the official clients open one per
    /// browser tab). Default 100.
    pub max_connections_per_user: usize,
    /// How long a negotiated connection waits for its WebSocket. Default 30 s.
    pub negotiate_ttl: Duration,
    /// Most negotiated connections waiting for a WebSocket at once. Default 100 000.
    pub max_pending_negotiations: usize,
    /// Most negotiated connections one user may have waiting for a WebSocket at once.
    /// Default 32.
    pub max_pending_negotiations_per_user: usize,
    /// Deadline of every call to the connection store; a call that takes longer fails with
    /// [`StoreError::Timeout`](switchboard_core::StoreError::Timeout). Default 5 s.
    pub store_timeout: Duration,
    /// WebSocket read buffer per connection, in bytes; larger frames grow it while they are
    /// read. Default 2 KiB.
    pub read_buffer_size: usize,
    /// WebSocket write buffer target per connection, in bytes. Default 8 KiB.
    pub write_buffer_size: usize,
    /// Node lease length for stores with leases (`--node-lease`). The node renews its lease,
    /// retries failed removals and sweeps expired nodes every third of it
    /// ([`HubOptions::heartbeat_interval`]). A node that crashed is invisible to lookups at
    /// most this long after its last renewal, and its records are deleted at most a third of
    /// it later. Default 30 s.
    pub lease: Duration,
    /// Removals from the store that failed and wait to be retried; past it, the oldest is
    /// given up (and logged). Default 100 000.
    pub max_pending_removals: usize,
    /// How long shutdown waits for sessions to close and clean up. Default 10 s.
    pub shutdown_grace: Duration,
    /// Offer stateful reconnect to clients that ask for it. Default `true`.
    pub stateful_reconnect: bool,
    /// How long a stateful connection whose transport dropped waits for the client to
    /// re-attach before it is disconnected. Default 15 s.
    pub reconnect_window: Duration,
    /// Bytes of unacknowledged records kept per stateful connection for the replay; sending
    /// waits for Acks above it. Default 100 000.
    pub reconnect_buffer_size: usize,
}

impl Default for HubOptions {
    fn default() -> Self {
        Self {
            keep_alive_interval: Duration::from_secs(15),
            client_timeout: Duration::from_secs(30),
            handshake_timeout: Duration::from_secs(15),
            max_record_size: 32 * 1024,
            send_queue_size: 1 << 20,
            send_timeout: Duration::from_secs(5),
            max_invocations_per_second: 500,
            invocation_burst: 500,
            max_parallel_invocations: 1,
            max_connections_per_user: 100,
            negotiate_ttl: Duration::from_secs(30),
            max_pending_negotiations: 100_000,
            max_pending_negotiations_per_user: 32,
            store_timeout: Duration::from_secs(5),
            read_buffer_size: 2 * 1024,
            write_buffer_size: 8 * 1024,
            lease: Duration::from_secs(30),
            max_pending_removals: 100_000,
            shutdown_grace: Duration::from_secs(10),
            stateful_reconnect: true,
            reconnect_window: Duration::from_secs(15),
            reconnect_buffer_size: 100_000,
        }
    }
}

impl HubOptions {
    /// Sets [`HubOptions::keep_alive_interval`].
    #[must_use]
    pub fn with_keep_alive_interval(mut self, value: Duration) -> Self {
        self.keep_alive_interval = value;
        self
    }

    /// Sets [`HubOptions::client_timeout`].
    #[must_use]
    pub fn with_client_timeout(mut self, value: Duration) -> Self {
        self.client_timeout = value;
        self
    }

    /// Sets [`HubOptions::handshake_timeout`].
    #[must_use]
    pub fn with_handshake_timeout(mut self, value: Duration) -> Self {
        self.handshake_timeout = value;
        self
    }

    /// Sets [`HubOptions::max_record_size`].
    #[must_use]
    pub fn with_max_record_size(mut self, bytes: usize) -> Self {
        self.max_record_size = bytes;
        self
    }

    /// Sets [`HubOptions::send_queue_size`] (bytes).
    #[must_use]
    pub fn with_send_queue_size(mut self, bytes: usize) -> Self {
        self.send_queue_size = bytes;
        self
    }

    /// Sets [`HubOptions::send_timeout`].
    #[must_use]
    pub fn with_send_timeout(mut self, value: Duration) -> Self {
        self.send_timeout = value;
        self
    }

    /// Sets [`HubOptions::max_invocations_per_second`] and [`HubOptions::invocation_burst`]
    /// (`per_second == 0` turns the limit off).
    #[must_use]
    pub fn with_invocation_rate(mut self, per_second: u32, burst: u32) -> Self {
        self.max_invocations_per_second = per_second;
        self.invocation_burst = burst;
        self
    }

    /// Sets [`HubOptions::max_parallel_invocations`] (at least 1 is used).
    #[must_use]
    pub fn with_max_parallel_invocations(mut self, value: usize) -> Self {
        self.max_parallel_invocations = value;
        self
    }

    /// Sets [`HubOptions::max_connections_per_user`] (at least 1 is used).
    #[must_use]
    pub fn with_max_connections_per_user(mut self, value: usize) -> Self {
        self.max_connections_per_user = value;
        self
    }

    /// Sets [`HubOptions::max_pending_negotiations`].
    #[must_use]
    pub fn with_max_pending_negotiations(mut self, value: usize) -> Self {
        self.max_pending_negotiations = value;
        self
    }

    /// Sets [`HubOptions::max_pending_negotiations_per_user`].
    #[must_use]
    pub fn with_max_pending_negotiations_per_user(mut self, value: usize) -> Self {
        self.max_pending_negotiations_per_user = value;
        self
    }

    /// Sets [`HubOptions::negotiate_ttl`].
    #[must_use]
    pub fn with_negotiate_ttl(mut self, value: Duration) -> Self {
        self.negotiate_ttl = value;
        self
    }

    /// Sets [`HubOptions::store_timeout`].
    #[must_use]
    pub fn with_store_timeout(mut self, value: Duration) -> Self {
        self.store_timeout = value;
        self
    }

    /// Sets [`HubOptions::lease`] (at least 30 ms, so a third of it is a usable interval).
    #[must_use]
    pub fn with_lease(mut self, lease: Duration) -> Self {
        self.lease = lease.max(Duration::from_millis(30));
        self
    }

    /// How often the node renews its lease, retries failed removals and sweeps: a third of
    /// [`HubOptions::lease`].
    pub fn heartbeat_interval(&self) -> Duration {
        self.lease / 3
    }

    /// Sets [`HubOptions::max_pending_removals`].
    #[must_use]
    pub fn with_max_pending_removals(mut self, value: usize) -> Self {
        self.max_pending_removals = value;
        self
    }

    /// Sets [`HubOptions::stateful_reconnect`] and [`HubOptions::reconnect_window`].
    #[must_use]
    pub fn with_stateful_reconnect(mut self, enabled: bool, window: Duration) -> Self {
        self.stateful_reconnect = enabled;
        self.reconnect_window = window;
        self
    }

    /// Sets [`HubOptions::shutdown_grace`].
    #[must_use]
    pub fn with_shutdown_grace(mut self, value: Duration) -> Self {
        self.shutdown_grace = value;
        self
    }
}
