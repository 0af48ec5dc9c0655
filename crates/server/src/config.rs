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
    /// Records queued per connection before it counts as too slow and is closed. Default 1024.
    pub send_queue_capacity: usize,
    /// How long a negotiated connection waits for its WebSocket. Default 30 s.
    pub negotiate_ttl: Duration,
    /// Most negotiated connections waiting for a WebSocket at once. Default 100 000.
    pub max_pending_negotiations: usize,
    /// WebSocket read buffer per connection, in bytes; larger frames grow it while they are
    /// read. Default 2 KiB.
    pub read_buffer_size: usize,
    /// WebSocket write buffer target per connection, in bytes. Default 8 KiB.
    pub write_buffer_size: usize,
    /// Node lease length for stores with leases. Default 30 s.
    pub lease: Duration,
    /// How often the node renews its lease and sweeps expired nodes. Default 10 s.
    pub heartbeat_interval: Duration,
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
            send_queue_capacity: 1024,
            negotiate_ttl: Duration::from_secs(30),
            max_pending_negotiations: 100_000,
            read_buffer_size: 2 * 1024,
            write_buffer_size: 8 * 1024,
            lease: Duration::from_secs(30),
            heartbeat_interval: Duration::from_secs(10),
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

    /// Sets [`HubOptions::send_queue_capacity`].
    #[must_use]
    pub fn with_send_queue_capacity(mut self, records: usize) -> Self {
        self.send_queue_capacity = records;
        self
    }

    /// Sets [`HubOptions::max_pending_negotiations`].
    #[must_use]
    pub fn with_max_pending_negotiations(mut self, value: usize) -> Self {
        self.max_pending_negotiations = value;
        self
    }

    /// Sets [`HubOptions::lease`] and [`HubOptions::heartbeat_interval`].
    #[must_use]
    pub fn with_lease(mut self, lease: Duration, heartbeat_interval: Duration) -> Self {
        self.lease = lease;
        self.heartbeat_interval = heartbeat_interval;
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
