-- The event store: the single source of truth. Append-only; see ARCHITECTURE.md.

-- The role the service acts as. It may append and read events, never change them.
DO $$
BEGIN
    CREATE ROLE crm_app NOLOGIN;
EXCEPTION
    WHEN duplicate_object OR unique_violation THEN NULL;
END
$$;

CREATE TABLE events (
    global_position bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id        uuid        NOT NULL UNIQUE,
    org_id          uuid        NOT NULL,
    aggregate_type  text        NOT NULL,
    aggregate_id    text        NOT NULL,
    sequence        bigint      NOT NULL CHECK (sequence > 0),
    event_type      text        NOT NULL,
    event_version   text        NOT NULL,
    payload         jsonb       NOT NULL,
    metadata        jsonb       NOT NULL,
    tx_id           xid8        NOT NULL DEFAULT pg_current_xact_id(),
    recorded_at     timestamptz NOT NULL DEFAULT clock_timestamp(),
    prev_hash       bytea,
    hash            bytea       NOT NULL,
    CONSTRAINT events_stream_sequence UNIQUE (aggregate_type, aggregate_id, sequence)
);

-- The relay and rebuilds read in commit order.
CREATE INDEX events_commit_order ON events (tx_id, global_position);

CREATE FUNCTION events_are_append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the events table is append-only: % is not allowed', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END
$$;

CREATE TRIGGER events_append_only
    BEFORE UPDATE OR DELETE OR TRUNCATE ON events
    FOR EACH STATEMENT EXECUTE FUNCTION events_are_append_only();

-- Snapshots are a cache: the state is encrypted under the subject's data key.
CREATE TABLE snapshots (
    aggregate_type text        NOT NULL,
    aggregate_id   text        NOT NULL,
    org_id         uuid        NOT NULL,
    last_sequence  bigint      NOT NULL,
    last_hash      bytea       NOT NULL,
    state          bytea       NOT NULL,
    taken_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (aggregate_type, aggregate_id)
);

-- Per-subject data keys, wrapped by the key-encryption key. A destroyed key keeps its
-- row (wrapped_key NULL, destroyed_at set) so it can never be created again.
CREATE TABLE data_keys (
    org_id       uuid        NOT NULL,
    subject_id   text        NOT NULL,
    kek_id       text        NOT NULL,
    wrapped_key  bytea,
    created_at   timestamptz NOT NULL DEFAULT now(),
    destroyed_at timestamptz,
    PRIMARY KEY (org_id, subject_id),
    CHECK ((wrapped_key IS NULL) = (destroyed_at IS NOT NULL))
);

-- Where the relay has got to, in commit order.
CREATE TABLE relay_checkpoints (
    name            text PRIMARY KEY,
    tx_id           xid8   NOT NULL,
    global_position bigint NOT NULL,
    updated_at      timestamptz NOT NULL DEFAULT now()
);

-- Where each projection has got to, in commit order; written in the same transaction
-- as the read model it describes.
CREATE TABLE projection_checkpoints (
    name            text PRIMARY KEY,
    tx_id           xid8   NOT NULL,
    global_position bigint NOT NULL,
    updated_at      timestamptz NOT NULL DEFAULT now()
);

GRANT USAGE ON SCHEMA public TO crm_app;
GRANT SELECT, INSERT ON events TO crm_app;
GRANT SELECT, INSERT, UPDATE, DELETE ON snapshots, data_keys, relay_checkpoints,
    projection_checkpoints TO crm_app;
