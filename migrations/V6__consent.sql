-- Consent, privacy settings and the send gate (issue 12).
--
-- The consent ledger, the privacy settings and messages are event streams like the
-- others (aggregate types `consent`, `privacy`, `message`). These tables are kept by
-- the commands' own transactions (an effect, as for access): what a request needs at
-- once, never behind the events. The read models of consent live in V9.

-- An organisation's privacy settings and purposes as its `privacy` stream last left
-- them (absent: the defaults, crm_domain::consent::privacy::PrivacySettings::defaults).
CREATE TABLE privacy_settings (
    org_id   uuid PRIMARY KEY,
    settings jsonb  NOT NULL,
    version  bigint NOT NULL
);

-- Open double opt-in confirmations, by the SHA-256 of their single-use token: the
-- public confirmation endpoint knows nothing but the token. A row is deleted when the
-- request is confirmed (single use); an expired row is refused and purged later.
CREATE TABLE consent_confirmations (
    token_sha256 text PRIMARY KEY,
    org_id       uuid        NOT NULL,
    contact_id   uuid        NOT NULL,
    expires_at   timestamptz NOT NULL
);
CREATE INDEX consent_confirmations_expiry ON consent_confirmations (expires_at);

-- Contact points nobody may message (bounces, erasure: issue 14), by the SHA-256 of
-- the lower-cased address or number; the event that put it there.
CREATE TABLE suppression_list (
    org_id        uuid NOT NULL,
    channel       text NOT NULL,
    point_sha256  text NOT NULL,
    event_id      uuid NOT NULL,
    PRIMARY KEY (org_id, channel, point_sha256)
);

GRANT SELECT, INSERT, UPDATE, DELETE ON privacy_settings, consent_confirmations, suppression_list
    TO crm_app;
