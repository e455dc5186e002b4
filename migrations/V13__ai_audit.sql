-- The AI audit log (issue 13): one row per AI action, folded from its `ai_action`
-- stream by the projection `ai_audit` (crm_projections::ai_audit,
-- infra::read_models::ai_audit) and rebuilt from the events alone like every read model.
--
-- `content` (the arguments and the summaries the agent acted on) and each step's `note`
-- (a reason, a refusal's message) are personal data: they are kept exactly as the event
-- store holds them, sealed (AES-256-GCM) under the action's data key, and opened by the
-- API for the reader. Shredding that key (erasing a contact the action touched) makes
-- them unreadable here too.
CREATE TABLE ai_audit (
    org_id           uuid        NOT NULL,
    action_id        uuid        NOT NULL,
    agent_id         uuid        NOT NULL,
    proposer_kind    text        NOT NULL,
    kind             text        NOT NULL,
    status           text        NOT NULL,
    risk             text        NOT NULL,
    rule             text        NOT NULL,
    initiated_by     text        NOT NULL,
    on_behalf_of     uuid,
    model            jsonb       NOT NULL,
    contacts         uuid[]      NOT NULL,
    user_id          uuid,
    arguments_sha256 text        NOT NULL,
    content          jsonb       NOT NULL,
    steps            jsonb       NOT NULL,
    result_events    uuid[]      NOT NULL,
    failure_reason   text,
    expires_at       timestamptz,
    proposed_at      timestamptz NOT NULL,
    updated_at       timestamptz NOT NULL,
    version          bigint      NOT NULL,
    last_position    bigint      NOT NULL,
    PRIMARY KEY (org_id, action_id)
);
-- Newest first by action id (UUID v7: proposal order); each filter of
-- `GET /v1/ai/audit` has an index in that order, the contact filter a GIN index of the
-- touched contacts, the time window the proposal time, and the approval queue and the
-- expiry sweep the pending actions only.
CREATE INDEX ai_audit_org_agent ON ai_audit (org_id, agent_id, action_id DESC);
CREATE INDEX ai_audit_org_status ON ai_audit (org_id, status, action_id DESC);
CREATE INDEX ai_audit_org_risk ON ai_audit (org_id, risk, action_id DESC);
CREATE INDEX ai_audit_org_kind ON ai_audit (org_id, kind, action_id DESC);
CREATE INDEX ai_audit_org_proposed ON ai_audit (org_id, proposed_at);
CREATE INDEX ai_audit_contacts ON ai_audit USING gin (contacts);
CREATE INDEX ai_audit_pending_expiry ON ai_audit (expires_at) WHERE status = 'pending_approval';
CREATE INDEX ai_audit_approved ON ai_audit (updated_at) WHERE status = 'approved';
GRANT SELECT, INSERT, UPDATE, DELETE ON ai_audit TO crm_app;

-- Row-level security as on every read model (V4; re-created by each rebuild from
-- infra::read_models::RLS_POLICY).
ALTER TABLE ai_audit ENABLE ROW LEVEL SECURITY;
CREATE POLICY org_isolation ON ai_audit
    USING ((SELECT current_setting('crm.scope', true)) = 'all'
           OR org_id = (SELECT NULLIF(current_setting('crm.org_id', true), '')::uuid));
