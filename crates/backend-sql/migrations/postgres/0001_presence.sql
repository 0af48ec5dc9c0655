-- Live connections only: a row exists exactly while its connection is live, and is deleted on
-- disconnect. `users` holds one row per user with at least one recorded connection, kept exact
-- by the triggers below in the same transaction as every change to `connections`.
-- Ids compare byte for byte: COLLATE "C".

CREATE TABLE nodes (
    node_id TEXT COLLATE "C" PRIMARY KEY,
    expires_at TIMESTAMPTZ NOT NULL,
    previous_expires_at TIMESTAMPTZ
);

CREATE TABLE users (
    user_id TEXT COLLATE "C" PRIMARY KEY,
    connections BIGINT NOT NULL,
    first_connected_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE connections (
    connection_id TEXT COLLATE "C" PRIMARY KEY,
    user_id TEXT COLLATE "C" NOT NULL,
    node_id TEXT COLLATE "C" NOT NULL,
    user_agent TEXT,
    connected_at BIGINT NOT NULL,
    last_seen TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE INDEX connections_by_user ON connections (user_id);
CREATE INDEX connections_by_node ON connections (node_id);

CREATE FUNCTION connections_added() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO users (user_id, connections) VALUES (NEW.user_id, 1)
    ON CONFLICT (user_id) DO UPDATE SET connections = users.connections + 1;
    RETURN NULL;
END
$$;

CREATE FUNCTION connections_removed() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    left_over BIGINT;
BEGIN
    UPDATE users SET connections = connections - 1 WHERE user_id = OLD.user_id
    RETURNING connections INTO left_over;
    IF left_over IS NOT NULL AND left_over <= 0 THEN
        DELETE FROM users WHERE user_id = OLD.user_id;
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER connections_added AFTER INSERT ON connections
    FOR EACH ROW EXECUTE FUNCTION connections_added();
CREATE TRIGGER connections_removed AFTER DELETE ON connections
    FOR EACH ROW EXECUTE FUNCTION connections_removed();
