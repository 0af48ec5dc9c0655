-- Presence: a node is alive while alive_until (the database's clock) is in the future.
CREATE TABLE nodes (
    node        text PRIMARY KEY,
    alive_until timestamptz NOT NULL
);

-- Which node subscribes to which channel (a ChannelNames channel name).
CREATE TABLE subscriptions (
    channel text NOT NULL,
    node    text NOT NULL,
    PRIMARY KEY (channel, node)
);
CREATE INDEX subscriptions_node ON subscriptions (node);

-- One row per target node and message; the target deletes its rows as it reads them.
CREATE TABLE inbox (
    seq        bigserial PRIMARY KEY,
    target     text NOT NULL,
    writer     text NOT NULL,
    wseq       bigint NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    payload    bytea NOT NULL
);
CREATE INDEX inbox_target ON inbox (target, seq);
CREATE INDEX inbox_created ON inbox (created_at);
