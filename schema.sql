-- The loyalty ledger's database schema. Applied at every start; every
-- statement is idempotent. Read-model tables belong to their projection
-- modules (projections/*.py), which create them beside a rebuild's shadow.
--
-- Every per-member table leads with stream_id (the member): it is the
-- distribution key when the store is sharded.

CREATE TABLE IF NOT EXISTS schema_migrations (
    version    integer PRIMARY KEY,
    applied_at timestamptz NOT NULL DEFAULT now()
);

-- The log. One row per event, appended, never changed.
CREATE TABLE IF NOT EXISTS events (
    position          bigint      PRIMARY KEY,
    stream_id         text        NOT NULL,
    stream_version    integer     NOT NULL CHECK (stream_version >= 1),
    type              text        NOT NULL,
    schema_version    integer     NOT NULL,
    occurred_at       timestamptz NOT NULL,
    recorded_at       timestamptz NOT NULL,
    command_id        text,
    actor             text,
    programme_version integer,
    data              jsonb       NOT NULL,
    hash              char(64)    NOT NULL,
    UNIQUE (stream_id, stream_version)
);
CREATE INDEX IF NOT EXISTS events_type_position ON events (type, position);
-- Each stream's first event: listing the members (jobs, replays, segments by
-- id) reads this small index instead of every event.
CREATE INDEX IF NOT EXISTS events_stream_starts ON events (stream_id) WHERE stream_version = 1;

-- The head of the log: the last position and its hash. Appends lock this one
-- row (SELECT ... FOR UPDATE) for the length of their transaction. That
-- serializes appends, so positions are assigned without gaps and commit in
-- position order: a reader that has seen position P can never later find a
-- new event at or below P. The hash chain needs the previous hash anyway, so
-- the chain and the ordering share one lock. Group commit (many commands in
-- one transaction) is what keeps the lock from limiting throughput.
CREATE TABLE IF NOT EXISTS event_head (
    singleton boolean  PRIMARY KEY DEFAULT true CHECK (singleton),
    position  bigint   NOT NULL,
    hash      char(64) NOT NULL
);
INSERT INTO event_head (singleton, position, hash)
VALUES (true, 0, repeat('0', 64))
ON CONFLICT (singleton) DO NOTHING;

CREATE OR REPLACE FUNCTION events_refuse_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'events are append-only: % refused', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END
$$;

-- CREATE OR REPLACE (PostgreSQL 14+) keeps restarts from dropping the guard
-- even for an instant.
CREATE OR REPLACE TRIGGER events_no_update BEFORE UPDATE OR DELETE ON events
    FOR EACH ROW EXECUTE FUNCTION events_refuse_change();
CREATE OR REPLACE TRIGGER events_no_truncate BEFORE TRUNCATE ON events
    FOR EACH STATEMENT EXECUTE FUNCTION events_refuse_change();

-- One identity (phone, unionid, ...) belongs to one member. Written in the
-- same transaction as the identity_linked event, so the database enforces it
-- across processes.
CREATE TABLE IF NOT EXISTS identities (
    identity_type text NOT NULL,
    value         text NOT NULL,
    stream_id     text NOT NULL,
    PRIMARY KEY (identity_type, value)
);

-- First answers, stored in the same transaction as the events they answer
-- for, so a retry after a crash gets the same answer, never a second effect.
-- Natural ids (purchase:P1, redemption:R1, ...) are per member; an
-- Idempotency-Key is global and stored with stream_id '*'.
CREATE TABLE IF NOT EXISTS command_results (
    stream_id    text        NOT NULL,
    command_key  text        NOT NULL,
    request_hash char(64)    NOT NULL,
    status       integer     NOT NULL,
    body         bytea       NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (stream_id, command_key)
);
-- Idempotency-Key answers are kept LOYALTY_IDEMPOTENCY_DAYS (natural ids'
-- for ever): the background pruning finds the old ones here.
CREATE INDEX IF NOT EXISTS command_results_idempotency_created
    ON command_results (created_at) WHERE stream_id = '*';

-- What each campaign has granted (CONTRACT §6.2): written with the events that
-- grant it, in the same transaction and under the head lock, by every path that
-- inserts events (appends and imports alike). An append re-checks its grants
-- against these counters there, so a budget is never exceeded, whichever
-- process appends. Derived from the log like command_results; returns never
-- reduce it.
CREATE TABLE IF NOT EXISTS campaign_spend (
    campaign_id    text   PRIMARY KEY,
    points         bigint NOT NULL DEFAULT 0,
    coupons        bigint NOT NULL DEFAULT 0,
    members        bigint NOT NULL DEFAULT 0   -- distinct members rewarded (campaign_spend_members)
);
CREATE TABLE IF NOT EXISTS campaign_spend_members (
    campaign_id text NOT NULL,
    stream_id   text NOT NULL,
    PRIMARY KEY (campaign_id, stream_id)
);

-- Member state snapshots: a cache of evolve(), validated by stream_version.
-- Losing one costs a longer fold, nothing else; `format` names the state's
-- shape so a changed shape ignores old snapshots.
CREATE TABLE IF NOT EXISTS member_snapshots (
    stream_id      text    PRIMARY KEY,
    stream_version integer NOT NULL,
    format         integer NOT NULL,
    state          bytea   NOT NULL
);

-- API keys, stored as SHA-256 of the secret; the secret is shown once.
CREATE TABLE IF NOT EXISTS api_keys (
    key_id     text        PRIMARY KEY,
    key_hash   char(64)    NOT NULL UNIQUE,
    name       text        NOT NULL,
    role       text        NOT NULL CHECK (role IN ('checkout', 'reader', 'auditor', 'admin')),
    created_at timestamptz NOT NULL DEFAULT now(),
    created_by text,
    revoked_at timestamptz
);

-- Projection checkpoints: written in the same transaction as the
-- projection's changes (exactly once across crashes).
CREATE TABLE IF NOT EXISTS projection_checkpoints (
    name       text        PRIMARY KEY,
    position   bigint      NOT NULL DEFAULT 0,
    state      text        NOT NULL DEFAULT 'live',
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- Publication to NATS JetStream (CONTRACT §7), one row per stream. The stream
-- itself is the truth of what was published (the publisher reconciles with its
-- last message at every start); this row is the publisher's progress for the
-- status and the lag, and where it starts when the stream holds no message.
-- `state` is `failed` (with the `reason`) while it cannot publish.
CREATE TABLE IF NOT EXISTS publication_checkpoints (
    stream          text        PRIMARY KEY,
    position        bigint      NOT NULL DEFAULT 0,
    stream_sequence bigint      NOT NULL DEFAULT 0,
    state           text        NOT NULL DEFAULT 'live' CHECK (state IN ('live', 'failed')),
    reason          text,
    updated_at      timestamptz NOT NULL DEFAULT now()
);

INSERT INTO schema_migrations (version) VALUES (1) ON CONFLICT DO NOTHING;
