-- Who may do what, as of now. Each table is written in the same transaction as the
-- events that change it (infra::access), so a request is authorised against exactly
-- what the event store says; the history of every grant is in the events.

-- A staff user's role (a built-in role's name, or a custom role's id in custom_role),
-- and the generation of its tokens: logout and a password change bump it, and a token
-- of an older generation is refused.
ALTER TABLE credentials
    ADD COLUMN role text,
    ADD COLUMN custom_role uuid,
    ADD COLUMN token_generation integer NOT NULL DEFAULT 0,
    -- TOTP (RFC 6238): the seed sealed under the user's data key, whether it is on,
    -- the last time step a code was accepted for (no code is accepted twice), and the
    -- SHA-256 digests of the unused backup codes.
    ADD COLUMN totp_secret bytea,
    ADD COLUMN totp_enabled boolean NOT NULL DEFAULT false,
    ADD COLUMN totp_last_step bigint NOT NULL DEFAULT 0,
    ADD COLUMN backup_codes bytea[] NOT NULL DEFAULT '{}';

UPDATE credentials c
SET role = e.payload -> 'UserRegistered' ->> 'role'
FROM events e
WHERE e.aggregate_type = 'user' AND e.aggregate_id = c.user_id::text AND e.sequence = 1;
UPDATE credentials SET role = 'owner' WHERE role IS NULL;
ALTER TABLE credentials ALTER COLUMN role SET NOT NULL;
CREATE INDEX credentials_org_role ON credentials (org_id, role) WHERE active;

-- Organisations: the modules they have switched on, and whether Owners and Admins
-- must use 2FA.
CREATE TABLE organizations (
    org_id              uuid PRIMARY KEY,
    modules             text[]  NOT NULL,
    two_factor_required boolean NOT NULL DEFAULT false
);
INSERT INTO organizations (org_id, modules)
SELECT org_id, ARRAY['core', 'contacts', 'activity', 'reports']
FROM events WHERE aggregate_type = 'organization' AND sequence = 1
ON CONFLICT DO NOTHING;

-- Custom roles.
CREATE TABLE roles (
    role_id uuid PRIMARY KEY,
    org_id  uuid    NOT NULL,
    name    text    NOT NULL,
    policy  jsonb   NOT NULL,
    retired boolean NOT NULL DEFAULT false
);
CREATE INDEX roles_org ON roles (org_id);

GRANT SELECT, INSERT, UPDATE, DELETE ON organizations, roles TO crm_app;

-- API keys: only a digest of the secret and its last four characters are kept.
CREATE TABLE api_keys (
    key_id       uuid PRIMARY KEY,
    org_id       uuid        NOT NULL,
    name         text        NOT NULL,
    digest       bytea       NOT NULL UNIQUE,
    last4        text        NOT NULL,
    role         text        NOT NULL,
    custom_role  uuid,
    only_permissions text[],
    expires_at   timestamptz,
    revoked_at   timestamptz,
    last_used_at timestamptz,
    created_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX api_keys_org ON api_keys (org_id);
GRANT SELECT, INSERT, UPDATE, DELETE ON api_keys TO crm_app;

-- Client portal logins: one per contact; the email is unique within an organisation.
CREATE TABLE portal_accounts (
    contact_id       uuid PRIMARY KEY,
    org_id           uuid    NOT NULL,
    email_lower      text    NOT NULL,
    password_hash    text,
    active           boolean NOT NULL DEFAULT true,
    token_generation integer NOT NULL DEFAULT 0,
    UNIQUE (org_id, email_lower)
);

-- Single-use tokens sent by mail (magic links, password resets): only a digest.
CREATE TABLE auth_tokens (
    digest     bytea PRIMARY KEY,
    purpose    text        NOT NULL,
    org_id     uuid        NOT NULL,
    subject_id uuid        NOT NULL,
    expires_at timestamptz NOT NULL,
    used_at    timestamptz
);
CREATE INDEX auth_tokens_expiry ON auth_tokens (expires_at);

GRANT SELECT, INSERT, UPDATE, DELETE ON portal_accounts, auth_tokens TO crm_app;

-- Row-level security on the read models: the API names the organisation in each
-- transaction (crm.org_id); projectors name every organisation (crm.scope = all).
-- A query that forgets its org filter still sees one organisation only. The same
-- policy is re-created by every rebuild (infra::read_models::RLS_POLICY). The settings
-- are read in sub-selects, so PostgreSQL reads them once per statement (an InitPlan),
-- not once per row.
ALTER TABLE contacts ENABLE ROW LEVEL SECURITY;
CREATE POLICY org_isolation ON contacts
    USING ((SELECT current_setting('crm.scope', true)) = 'all'
           OR org_id = (SELECT NULLIF(current_setting('crm.org_id', true), '')::uuid));
ALTER TABLE activity ENABLE ROW LEVEL SECURITY;
CREATE POLICY org_isolation ON activity
    USING ((SELECT current_setting('crm.scope', true)) = 'all'
           OR org_id = (SELECT NULLIF(current_setting('crm.org_id', true), '')::uuid));
