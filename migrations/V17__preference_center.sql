-- The preference center (issue 14): links that open a contact's page, and the
-- single-use links that confirm an erasure asked for there. Both by the SHA-256 of
-- their token: the token itself is shown once and never stored.
CREATE TABLE preference_tokens (
    token_sha256 text        PRIMARY KEY,
    org_id       uuid        NOT NULL,
    contact_id   uuid        NOT NULL,
    expires_at   timestamptz NOT NULL,
    revoked_at   timestamptz,
    created_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX preference_tokens_contact ON preference_tokens (org_id, contact_id);

CREATE TABLE erasure_confirmations (
    token_sha256 text        PRIMARY KEY,
    org_id       uuid        NOT NULL,
    contact_id   uuid        NOT NULL,
    -- Where the contact asked: `preference_center` or `portal`.
    source       text        NOT NULL,
    expires_at   timestamptz NOT NULL
);

GRANT SELECT, INSERT, UPDATE, DELETE ON preference_tokens, erasure_confirmations TO crm_app;
