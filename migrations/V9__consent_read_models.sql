-- The read models of consent (issue 12), fed by the projections `consent_state` and
-- `consent_log` (crm_projections::consent, infra::read_models::{consent_state,
-- consent_log}) and rebuilt from the events alone like the others.

-- Each contact's current consent: the send gate's state folded from its `consent`
-- stream (records with the event behind each, Do Not Contact, the sale/sharing
-- opt-out, as jsonb), and from its `contact` stream the contact points and time zone
-- the gate needs (`points`: e-mail, phone, address, time zone; the columns are what
-- `POST /v1/consent/check` reads, the postal address as one line). The last sequence
-- applied of each stream makes the projection idempotent.
CREATE TABLE consent_state (
    org_id          uuid        NOT NULL,
    contact_id      uuid        NOT NULL,
    state           jsonb       NOT NULL,
    points          jsonb       NOT NULL,
    email           text,
    phone           text,
    postal          text,
    time_zone       text,
    contact_version bigint      NOT NULL,
    consent_version bigint      NOT NULL,
    last_position   bigint      NOT NULL,
    updated_at      timestamptz NOT NULL,
    PRIMARY KEY (org_id, contact_id)
);

-- The ConsentLog: one row per consent event, with its proof, who made the change, from
-- where (IP, user agent: shown only to holders of consent.proof.view) and the event's
-- hash. Newest first by position, like the activity log; each documented filter of
-- `GET /v1/consent/log` has an index in that order, and `since`/`until` read the
-- window by `occurred_at` (see `ListQuery::window_page`).
CREATE TABLE consent_log (
    org_id          uuid        NOT NULL,
    event_id        uuid        NOT NULL,
    global_position bigint      NOT NULL,
    contact_id      uuid        NOT NULL,
    action          text        NOT NULL,
    channel         text,
    purpose         text,
    status          text,
    contact_point   text,
    lawful_basis    text,
    source          text,
    notice_id       text,
    notice_version  text,
    notice_sha256   text,
    language        text,
    jurisdiction    text,
    expires_at      timestamptz,
    import_id       uuid,
    actor_kind      text        NOT NULL,
    actor_id        text        NOT NULL,
    occurred_at     timestamptz NOT NULL,
    recorded_at     timestamptz NOT NULL,
    ip              text,
    user_agent      text,
    event_hash      text        NOT NULL,
    PRIMARY KEY (org_id, event_id)
);
CREATE INDEX consent_log_org_position ON consent_log (org_id, global_position DESC);
CREATE INDEX consent_log_org_contact ON consent_log (org_id, contact_id, global_position DESC);
CREATE INDEX consent_log_org_channel ON consent_log (org_id, channel, global_position DESC);
CREATE INDEX consent_log_org_purpose ON consent_log (org_id, purpose, global_position DESC);
CREATE INDEX consent_log_org_source ON consent_log (org_id, source, global_position DESC);
CREATE INDEX consent_log_org_occurred ON consent_log (org_id, occurred_at);

GRANT SELECT, INSERT, UPDATE, DELETE ON consent_state, consent_log TO crm_app;

-- Row-level security as on every read model (V4; re-created by each rebuild from
-- infra::read_models::RLS_POLICY).
ALTER TABLE consent_state ENABLE ROW LEVEL SECURITY;
CREATE POLICY org_isolation ON consent_state
    USING ((SELECT current_setting('crm.scope', true)) = 'all'
           OR org_id = (SELECT NULLIF(current_setting('crm.org_id', true), '')::uuid));
ALTER TABLE consent_log ENABLE ROW LEVEL SECURITY;
CREATE POLICY org_isolation ON consent_log
    USING ((SELECT current_setting('crm.scope', true)) = 'all'
           OR org_id = (SELECT NULLIF(current_setting('crm.org_id', true), '')::uuid));
