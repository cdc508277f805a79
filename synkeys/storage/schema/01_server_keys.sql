-- One row per (server_name, key_id): the newest checked response that
-- lists that key id, kept verbatim as canonical JSON so it can be relayed
-- with its signatures intact. A key id the origin stops listing keeps the
-- row of the last response that listed it.
--
-- {bytes} is BLOB on SQLite and BYTEA on PostgreSQL.

CREATE TABLE server_keys (
    server_name     TEXT NOT NULL,
    key_id          TEXT NOT NULL,
    -- the 32 raw bytes of the ed25519 public key
    key_bytes       {bytes} NOT NULL,
    -- NULL for a key under verify_keys; its expired_ts (ms) under old_verify_keys
    expired_ts      BIGINT,
    -- the response's valid_until_ts (ms)
    valid_until_ts  BIGINT NOT NULL,
    -- when the response was fetched (ms)
    fetched_ts      BIGINT NOT NULL,
    -- who the response came from: the origin, or the notary that relayed it
    source          TEXT NOT NULL,
    -- the whole response as canonical JSON bytes
    response        {bytes} NOT NULL,
    PRIMARY KEY (server_name, key_id)
);
