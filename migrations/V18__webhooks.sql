-- Outbound webhooks (infra::webhooks, docs/webhooks.md).

-- An endpoint as its webhook_endpoint stream says now, written by the same transaction
-- as its events (a deleted endpoint has no row). The signing secrets are vault rows
-- (record type `webhook`, record id `<endpoint>/<version>`, field `secret`): the
-- current version, and the one before while `previous_valid_until` has not passed.
-- The failure counters are the delivery worker's, reset by any delivered message.
CREATE TABLE webhook_endpoints (
    org_id               uuid        NOT NULL,
    endpoint_id          uuid        NOT NULL,
    url                  text        NOT NULL,
    event_types          text[]      NOT NULL,
    description          text,
    role                 text        NOT NULL,
    ordered              boolean     NOT NULL DEFAULT false,
    status               text        NOT NULL
                         CHECK (status IN ('enabled', 'disabled', 'auto_disabled')),
    secret_version       integer     NOT NULL DEFAULT 1,
    secret_last4         text,
    previous_valid_until timestamptz,
    consecutive_failures integer     NOT NULL DEFAULT 0,
    failing_since        timestamptz,
    created_at           timestamptz NOT NULL DEFAULT now(),
    updated_at           timestamptz NOT NULL DEFAULT now(),
    disabled_at          timestamptz,
    PRIMARY KEY (org_id, endpoint_id)
);
CREATE UNIQUE INDEX webhook_endpoints_id ON webhook_endpoints (endpoint_id);
GRANT SELECT, INSERT, UPDATE, DELETE ON webhook_endpoints TO crm_app;

-- One message per (endpoint, event): what an endpoint is to receive, its state and its
-- next attempt. `id` is the `webhook-id` (`msg_` + its hex), the same for every
-- attempt. The body is not kept: each attempt shapes it again from the stored event,
-- so an erased contact's data is gone from later attempts too.
--   pending   due at next_attempt_at
--   sending   taken by a worker until lease_until (a worker that died leaves it to
--             be taken again once the lease has passed)
--   delivered the receiver answered 2xx
--   failed    every attempt of the schedule failed
--   missed    the endpoint was disabled (a replay sends it)
--   dropped   the endpoint's role may no longer receive its type
CREATE TABLE webhook_messages (
    id              uuid        PRIMARY KEY,
    -- The order the feed handed the events over in (commit order): an ordered
    -- endpoint receives its messages in this order.
    seq             bigint      GENERATED ALWAYS AS IDENTITY,
    org_id          uuid        NOT NULL,
    endpoint_id     uuid        NOT NULL,
    event_id        uuid        NOT NULL,
    position        bigint      NOT NULL,
    event_type      text        NOT NULL,
    status          text        NOT NULL
                    CHECK (status IN ('pending', 'sending', 'delivered', 'failed', 'missed', 'dropped')),
    attempts        integer     NOT NULL DEFAULT 0,
    next_attempt_at timestamptz,
    lease_until     timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now(),
    finished_at     timestamptz,
    last_status     integer,
    last_error      text,
    UNIQUE (endpoint_id, event_id)
);
CREATE INDEX webhook_messages_due ON webhook_messages (next_attempt_at)
    WHERE status = 'pending';
CREATE INDEX webhook_messages_leased ON webhook_messages (lease_until)
    WHERE status = 'sending';
CREATE INDEX webhook_messages_endpoint ON webhook_messages (endpoint_id, seq);
CREATE INDEX webhook_messages_endpoint_time ON webhook_messages (org_id, endpoint_id, created_at);
CREATE INDEX webhook_messages_finished ON webhook_messages (finished_at)
    WHERE finished_at IS NOT NULL;
GRANT SELECT, INSERT, UPDATE, DELETE ON webhook_messages TO crm_app;

-- Every attempt: started (a row without finished_at is one a worker did not live to
-- finish), its answer, how long it took, a bounded excerpt of the response body, and
-- when the next attempt is due.
CREATE TABLE webhook_attempts (
    message_id       uuid        NOT NULL,
    attempt          integer     NOT NULL,
    org_id           uuid        NOT NULL,
    endpoint_id      uuid        NOT NULL,
    started_at       timestamptz NOT NULL,
    finished_at      timestamptz,
    status_code      integer,
    latency_ms       integer,
    error            text,
    response_excerpt text        CHECK (length(response_excerpt) <= 1024),
    next_attempt_at  timestamptz,
    PRIMARY KEY (message_id, attempt)
);
CREATE INDEX webhook_attempts_endpoint ON webhook_attempts (org_id, endpoint_id, started_at);
CREATE INDEX webhook_attempts_started ON webhook_attempts (started_at);
GRANT SELECT, INSERT, UPDATE, DELETE ON webhook_attempts TO crm_app;

ALTER TABLE webhook_endpoints ENABLE ROW LEVEL SECURITY;
CREATE POLICY org_isolation ON webhook_endpoints
    USING ((SELECT current_setting('crm.scope', true)) = 'all'
           OR org_id = (SELECT NULLIF(current_setting('crm.org_id', true), '')::uuid));
ALTER TABLE webhook_messages ENABLE ROW LEVEL SECURITY;
CREATE POLICY org_isolation ON webhook_messages
    USING ((SELECT current_setting('crm.scope', true)) = 'all'
           OR org_id = (SELECT NULLIF(current_setting('crm.org_id', true), '')::uuid));
ALTER TABLE webhook_attempts ENABLE ROW LEVEL SECURITY;
CREATE POLICY org_isolation ON webhook_attempts
    USING ((SELECT current_setting('crm.scope', true)) = 'all'
           OR org_id = (SELECT NULLIF(current_setting('crm.org_id', true), '')::uuid));
