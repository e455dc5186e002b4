-- Consent receipts (infra::receipts, docs/consent.md "Receipts"): the Ed25519 keys
-- that sign them, and every receipt issued.

-- The signing keys of the whole service (not of an organisation). The private half is
-- stored only wrapped by the key-encryption key (AAD `receipt-key|<kid>`). A key is
-- never deleted: once retired it no longer signs, but stays in the public JWKS so the
-- receipts it signed still verify.
CREATE TABLE receipt_keys (
    kid         text        PRIMARY KEY,
    public_key  bytea       NOT NULL CHECK (length(public_key) = 32),
    kek_id      text        NOT NULL,
    wrapped_key bytea       NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    retired_at  timestamptz
);
-- Exactly one key signs: the only one not retired.
CREATE UNIQUE INDEX receipt_keys_one_active ON receipt_keys ((true)) WHERE retired_at IS NULL;

GRANT SELECT, INSERT, UPDATE ON receipt_keys TO crm_app;

-- One receipt per consent event, issued once: never changed.
CREATE TABLE consent_receipts (
    org_id    uuid        NOT NULL,
    event_id  uuid        NOT NULL,
    kid       text        NOT NULL REFERENCES receipt_keys (kid),
    jws       text        NOT NULL,
    issued_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (org_id, event_id)
);

GRANT SELECT, INSERT ON consent_receipts TO crm_app;

-- Row-level security as on the read models (V4, infra::read_models::RLS_POLICY): a
-- row is visible, and may be inserted, only in a transaction that named its
-- organisation (crm.org_id).
ALTER TABLE consent_receipts ENABLE ROW LEVEL SECURITY;
CREATE POLICY org_isolation ON consent_receipts
    USING ((SELECT current_setting('crm.scope', true)) = 'all'
           OR org_id = (SELECT NULLIF(current_setting('crm.org_id', true), '')::uuid));
