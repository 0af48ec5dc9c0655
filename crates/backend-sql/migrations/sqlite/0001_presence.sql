-- Live connections only: a row exists exactly while its connection is live, and is deleted on
-- disconnect. `users` holds one row per user with at least one recorded connection, kept exact
-- by the triggers below in the same transaction as every change to `connections`.
-- Times of leases are seconds since the Unix epoch on SQLite's own clock (unixepoch('subsec')).
-- TEXT compares with BINARY (memcmp): byte order.

CREATE TABLE nodes (
    node_id TEXT PRIMARY KEY,
    expires_at REAL NOT NULL,
    previous_expires_at REAL
) WITHOUT ROWID;

CREATE TABLE users (
    user_id TEXT PRIMARY KEY,
    connections INTEGER NOT NULL,
    first_connected_at REAL NOT NULL DEFAULT (unixepoch('subsec'))
) WITHOUT ROWID;

CREATE TABLE connections (
    connection_id TEXT PRIMARY KEY,
    user_id TEXT NOT NULL,
    node_id TEXT NOT NULL,
    user_agent TEXT,
    connected_at INTEGER NOT NULL,
    last_seen REAL NOT NULL DEFAULT (unixepoch('subsec'))
) WITHOUT ROWID;

CREATE INDEX connections_by_user ON connections (user_id);
CREATE INDEX connections_by_node ON connections (node_id);

CREATE TRIGGER connections_added AFTER INSERT ON connections
BEGIN
    INSERT INTO users (user_id, connections) VALUES (NEW.user_id, 1)
    ON CONFLICT (user_id) DO UPDATE SET connections = connections + 1;
END;

CREATE TRIGGER connections_removed AFTER DELETE ON connections
BEGIN
    UPDATE users SET connections = connections - 1 WHERE user_id = OLD.user_id;
    DELETE FROM users WHERE user_id = OLD.user_id AND connections <= 0;
END;
