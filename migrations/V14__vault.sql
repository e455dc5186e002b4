-- The credentials vault (infra::vault, docs/vault.md): every secret the service keeps
-- for an organisation — an AI provider's API key, a carrier's SMTP password or Twilio
-- auth token — is one row here, sealed with AES-256-GCM under the KEK (a fresh 96-bit
-- nonce per value), its associated data binding the organisation, the record type, the
-- record id and the field: a sealed value copied to another row does not decrypt.
-- Rows are written and deleted by the transaction that appends the owning stream's
-- event (CredentialCreated, CredentialRotated, CredentialDeleted, CarrierConfigured,
-- CarrierRemoved); the secret is never stored or answered in clear, only its last four
-- characters are kept beside it.
CREATE TABLE vault_secrets (
    org_id      uuid        NOT NULL,
    -- `credential` (an AI provider credential, record id = its UUID) or `carrier`
    -- (record id = the channel's name).
    record_type text        NOT NULL CHECK (record_type ~ '^[a-z_]{1,32}$'),
    record_id   text        NOT NULL CHECK (length(record_id) BETWEEN 1 AND 200),
    field       text        NOT NULL CHECK (field ~ '^[a-z_]{1,32}$'),
    -- nonce (12 bytes) || ciphertext || tag (16 bytes).
    sealed      bytea       NOT NULL CHECK (length(sealed) >= 28),
    kek_id      text        NOT NULL,
    last4       text        CHECK (length(last4) = 4),
    created_at  timestamptz NOT NULL DEFAULT now(),
    -- When the current value was sealed (= created_at until the first rotation).
    sealed_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (org_id, record_type, record_id, field)
);
GRANT SELECT, INSERT, UPDATE, DELETE ON vault_secrets TO crm_app;

-- One organisation's rows only, inside a transaction that names it (crm.org_id), as
-- carrier_secrets (V8).
ALTER TABLE vault_secrets ENABLE ROW LEVEL SECURITY;
CREATE POLICY org_isolation ON vault_secrets
    USING ((SELECT current_setting('crm.scope', true)) = 'all'
           OR org_id = (SELECT NULLIF(current_setting('crm.org_id', true), '')::uuid));

-- AI provider credentials ("bring your own key"): the non-secret part of each, as its
-- credential stream says now (written by the same transaction as its events; a deleted
-- credential has no row). The secret is the vault row (credential, id, secret).
CREATE TABLE ai_credentials (
    org_id       uuid        NOT NULL,
    id           uuid        NOT NULL,
    provider     text        NOT NULL
                 CHECK (provider IN ('openai', 'anthropic', 'azure_openai', 'google', 'other')),
    label        text        NOT NULL,
    base_url     text        NOT NULL,
    secret_last4 text,
    created_at   timestamptz NOT NULL DEFAULT now(),
    rotated_at   timestamptz,
    PRIMARY KEY (org_id, id)
);
GRANT SELECT, INSERT, UPDATE, DELETE ON ai_credentials TO crm_app;

ALTER TABLE ai_credentials ENABLE ROW LEVEL SECURITY;
CREATE POLICY org_isolation ON ai_credentials
    USING ((SELECT current_setting('crm.scope', true)) = 'all'
           OR org_id = (SELECT NULLIF(current_setting('crm.org_id', true), '')::uuid));

-- Carriers move onto the vault: their secrets are now written to vault_secrets
-- (record type `carrier`, record id = the channel, field `secret`), and
-- carrier_secrets keeps the non-secret settings. A secret sealed before this migration
-- stays in carrier_secrets.sealed_secret: it is bound to `carrier|<org>|<channel>`
-- and can only be re-bound with the KEK, which SQL does not have. So nothing is lost:
-- where the vault holds no secret for a carrier, the service reads this legacy one
-- (recording the decryption first, as for any secret), and the next configuration of
-- the carrier writes the vault and clears the legacy column.
-- `SELECT count(*) FROM carrier_secrets WHERE sealed_secret IS NOT NULL` counts the
-- carriers not moved yet.
COMMENT ON COLUMN carrier_secrets.sealed_secret IS
    'legacy (before V14): the secret sealed to carrier|org|channel; new secrets live in vault_secrets';
