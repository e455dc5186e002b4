-- The contacts read model shows, beside the legal hold, whether the contact's
-- processing is restricted (GDPR Art. 18: `ProcessingRestricted` until
-- `ProcessingRestrictionLifted`) and its own retention period (`RetentionPeriodSet`;
-- null: the organisation's). Both are folded by the contacts projection from now on;
-- rows written before are brought level here from the events and from
-- `contact_retention` (the projection applies any later event on top, in order).
ALTER TABLE contacts ADD COLUMN processing_restricted boolean NOT NULL DEFAULT false;
ALTER TABLE contacts ADD COLUMN retention_days integer;

UPDATE contacts c SET processing_restricted = true
FROM (
    SELECT DISTINCT ON (org_id, aggregate_id) org_id, aggregate_id, event_type
    FROM events
    WHERE aggregate_type = 'contact'
      AND event_type IN ('ProcessingRestricted', 'ProcessingRestrictionLifted', 'ContactErased')
    ORDER BY org_id, aggregate_id, sequence DESC
) last
WHERE last.event_type = 'ProcessingRestricted'
  AND c.org_id = last.org_id AND c.id::text = last.aggregate_id;

UPDATE contacts c SET retention_days = r.days
FROM contact_retention r
WHERE r.org_id = c.org_id AND r.contact_id = c.id AND c.erased_at IS NULL;

-- `contacts_matching` (V5, V15) answers the read model's columns, the two new ones too.
DROP FUNCTION contacts_matching(text, text, text, boolean, timestamptz, uuid, bigint);
CREATE FUNCTION contacts_matching(
    pattern text, email_is text, company_is text, archived_is boolean,
    updated_since timestamptz, after_id uuid, page_size bigint)
RETURNS TABLE (id uuid, org_id uuid, version bigint, profile jsonb, archived boolean,
               created_at timestamptz, updated_at timestamptz, last_position bigint,
               erased_at timestamptz, legal_hold boolean, processing_restricted boolean,
               retention_days integer)
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    org uuid := NULLIF(current_setting('crm.org_id', true), '')::uuid;
    sql text := 'SELECT c.id, c.org_id, c.version, c.profile, c.archived, c.created_at, '
        'c.updated_at, c.last_position, c.erased_at, c.legal_hold, '
        'c.processing_restricted, c.retention_days FROM public.contacts c '
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
