-- Carriers: how each organisation sends email, SMS and WhatsApp (infra::dispatch::carriers).
-- One row per (organisation, channel), written by the same transaction that appends the
-- carrier stream's CarrierConfigured / CarrierRemoved event. The secret (SMTP password,
-- Twilio auth token) is sealed with AES-256-GCM under the KEK, bound to
-- `carrier|<org>|<channel>`; it is never stored or returned in clear: only its last four
-- characters are kept beside it.
CREATE TABLE carrier_secrets (
    org_id        uuid        NOT NULL,
    channel       text        NOT NULL CHECK (channel IN ('email', 'sms', 'whatsapp')),
    kind          text        NOT NULL CHECK (kind IN ('smtp', 'twilio')),
    -- The non-secret settings, as in the event (CarrierSettings).
    settings      jsonb       NOT NULL,
    sealed_secret bytea,
    secret_last4  text,
    kek_id        text        NOT NULL,
    configured_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (org_id, channel)
);
GRANT SELECT, INSERT, UPDATE, DELETE ON carrier_secrets TO crm_app;

-- One organisation's rows only, inside a transaction that names it (crm.org_id), as
-- the read models (V4).
ALTER TABLE carrier_secrets ENABLE ROW LEVEL SECURITY;
CREATE POLICY org_isolation ON carrier_secrets
    USING ((SELECT current_setting('crm.scope', true)) = 'all'
           OR org_id = (SELECT NULLIF(current_setting('crm.org_id', true), '')::uuid));
