-- Data-subject rights (issue 14): erasure by crypto-shredding.

-- Whose erasure destroys a data key besides its own subject's: a message's recipient,
-- the contacts an AI action touches. Written with the key (the event that creates it
-- names them: crm_domain::PersonalData::key_owners), so an erasure finds every key
-- that holds the contact's data in the same statement that destroys them.
ALTER TABLE data_keys ADD COLUMN owners uuid[] NOT NULL DEFAULT '{}';
CREATE INDEX data_keys_owners ON data_keys USING gin (owners);

-- Keys created before this column existed: the owners their streams' first events name
-- (neither field is personal, so both are readable in the stored payloads).
UPDATE data_keys d
SET owners = ARRAY[(e.payload -> e.event_type ->> 'contact_id')::uuid]
FROM events e
WHERE e.org_id = d.org_id AND e.aggregate_type = 'message' AND e.aggregate_id = d.subject_id
  AND e.sequence = 1 AND e.event_type IN ('MessageQueued', 'MessageBlocked');
UPDATE data_keys d
SET owners = ARRAY(SELECT jsonb_array_elements_text(
                       e.payload -> 'AiActionProposed' -> 'request' -> 'contacts')::uuid)
FROM events e
WHERE e.org_id = d.org_id AND e.aggregate_type = 'ai_action' AND e.aggregate_id = d.subject_id
  AND e.sequence = 1 AND e.event_type = 'AiActionProposed';

-- The suppression list is keyed by an HMAC under the organisation's own key (a plain
-- hash of an address is reversed by hashing a list of addresses). Nothing wrote it
-- before erasure existed.
DELETE FROM suppression_list;
ALTER TABLE suppression_list RENAME COLUMN point_sha256 TO point_hmac;

-- The contacts read model shows an erased contact as erased (its profile emptied) and
-- whether a legal hold is in place.
ALTER TABLE contacts ADD COLUMN erased_at timestamptz;
ALTER TABLE contacts ADD COLUMN legal_hold boolean NOT NULL DEFAULT false;

-- Erasure receipts: one per erasure, folded from its tombstone (`ContactErased`) by
-- the projection `erasure_receipts` and rebuilt from the events like every read
-- model. No personal data: the contact's id (a pseudonym once its keys are gone), who
-- asked and when, the keys destroyed, the channels suppressed, the tombstone's hash.
CREATE TABLE erasure_receipts (
    org_id             uuid        NOT NULL,
    request_id         uuid        NOT NULL,
    subject_id         uuid        NOT NULL,
    source             text        NOT NULL,
    requested_by_kind  text        NOT NULL,
    requested_by       text        NOT NULL,
    requested_at       timestamptz NOT NULL,
    erased_at          timestamptz NOT NULL,
    keys_destroyed     text[]      NOT NULL,
    suppressed         text[]      NOT NULL,
    tombstone_event_id uuid        NOT NULL,
    tombstone_position bigint      NOT NULL,
    tombstone_hash     text        NOT NULL,
    PRIMARY KEY (org_id, request_id)
);
CREATE INDEX erasure_receipts_org_position ON erasure_receipts (org_id, tombstone_position DESC);
CREATE INDEX erasure_receipts_org_subject ON erasure_receipts (org_id, subject_id);
GRANT SELECT, INSERT, UPDATE, DELETE ON erasure_receipts TO crm_app;

ALTER TABLE erasure_receipts ENABLE ROW LEVEL SECURITY;
CREATE POLICY org_isolation ON erasure_receipts
    USING ((SELECT current_setting('crm.scope', true)) = 'all'
           OR org_id = (SELECT NULLIF(current_setting('crm.org_id', true), '')::uuid));

-- `contacts_matching` (V5) answers the read model's columns, the two new ones too.
DROP FUNCTION contacts_matching(text, text, text, boolean, timestamptz, uuid, bigint);
CREATE FUNCTION contacts_matching(
    pattern text, email_is text, company_is text, archived_is boolean,
    updated_since timestamptz, after_id uuid, page_size bigint)
RETURNS TABLE (id uuid, org_id uuid, version bigint, profile jsonb, archived boolean,
               created_at timestamptz, updated_at timestamptz, last_position bigint,
               erased_at timestamptz, legal_hold boolean)
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    org uuid := NULLIF(current_setting('crm.org_id', true), '')::uuid;
    sql text := 'SELECT c.id, c.org_id, c.version, c.profile, c.archived, c.created_at, '
        'c.updated_at, c.last_position, c.erased_at, c.legal_hold FROM public.contacts c '
        'WHERE c.org_id = $1 AND c.search_text LIKE $2';
BEGIN
    IF org IS NULL OR pattern IS NULL THEN
        RETURN;
    END IF;
    IF email_is IS NOT NULL THEN sql := sql || ' AND c.email = $3'; END IF;
    IF company_is IS NOT NULL THEN sql := sql || ' AND c.company = $4'; END IF;
    IF archived_is IS NOT NULL THEN sql := sql || ' AND c.archived = $5'; END IF;
    IF updated_since IS NOT NULL THEN sql := sql || ' AND c.updated_at >= $6'; END IF;
    IF after_id IS NOT NULL THEN sql := sql || ' AND c.id > $7'; END IF;
    sql := sql || ' ORDER BY c.id LIMIT $8';
    RETURN QUERY EXECUTE sql
        USING org, pattern, email_is, company_is, archived_is, updated_since, after_id,
              page_size;
END
$fn$;
REVOKE ALL ON FUNCTION contacts_matching(text, text, text, boolean, timestamptz, uuid, bigint)
    FROM PUBLIC;
GRANT EXECUTE ON FUNCTION contacts_matching(text, text, text, boolean, timestamptz, uuid, bigint)
    TO crm_app;

-- Secrets of an organisation that are not a subject's data key: the key of the
-- suppression list's HMAC. Wrapped by the KEK like every key; never destroyed (an
-- erased address must stay suppressed).
CREATE TABLE org_secrets (
    org_id     uuid        NOT NULL,
    purpose    text        NOT NULL,
    kek_id     text        NOT NULL,
    wrapped    bytea       NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (org_id, purpose)
);
GRANT SELECT, INSERT ON org_secrets TO crm_app;
