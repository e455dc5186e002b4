-- Reads that stay fast as an organisation grows (docs/benchmarks.md, "Scale phase").

-- `GET /v1/contacts?q=`: a case-insensitive substring of name, email or company
-- (`search_text LIKE '%…%'`). A trigram index serves any pattern of three or more
-- characters; PostgreSQL rechecks every candidate row against the pattern, so the rows
-- are exactly those of the LIKE. Shorter patterns match so many rows that walking the
-- primary key in id order finds a page at once. (One column, not (org_id, …) with
-- btree_gin: an organisation's entry would list every one of its rows, read whole by
-- each query.) pg_trgm is a trusted extension: a database owner may create it.
CREATE EXTENSION IF NOT EXISTS pg_trgm;
CREATE INDEX contacts_search_trgm ON contacts USING gin (search_text gin_trgm_ops);

-- Under row-level security PostgreSQL evaluates the policy before any operator that is
-- not LEAKPROOF, and LIKE is not (a bad pattern raises an error): as `crm_app`, the
-- trigram index could not serve `q`, and a page read every row of the organisation
-- (200 ms at a million contacts). This function runs the `q` list as the tables' owner,
-- whom the policy does not bind, and applies the policy's own condition itself: only
-- rows of the organisation the transaction named (`crm.org_id`, set by
-- `read_models::org_scope`), none when it named none. Its SQL is fixed text with
-- parameters; the other filters are added only when given, so each call is planned
-- for what it asks.
CREATE FUNCTION contacts_matching(
    pattern text, email_is text, company_is text, archived_is boolean,
    updated_since timestamptz, after_id uuid, page_size bigint)
RETURNS TABLE (id uuid, org_id uuid, version bigint, profile jsonb, archived boolean,
               created_at timestamptz, updated_at timestamptz, last_position bigint)
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    org uuid := NULLIF(current_setting('crm.org_id', true), '')::uuid;
    sql text := 'SELECT c.id, c.org_id, c.version, c.profile, c.archived, c.created_at, '
        'c.updated_at, c.last_position FROM public.contacts c '
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

-- The exact filters of `GET /v1/contacts`, in the list's order (by id), so that a page
-- of a common company is a range of the index rather than a sort of all its rows;
-- `archived=true` (a few rows, however many contacts) likewise; `updated_since` reads
-- the contacts changed since then by this index (see `ListQuery::window_page`).
-- (By definition, not by name: a `crm rebuild` before this version left generated names.)
DO $$
DECLARE
    old_index regclass;
BEGIN
    FOR old_index IN
        SELECT x.indexrelid::regclass FROM pg_index x
        WHERE x.indrelid = 'contacts'::regclass AND NOT x.indisunique
          AND regexp_replace(pg_get_indexdef(x.indexrelid), '^.*? USING ', '')
              IN ('btree (org_id, email)', 'btree (org_id, company)')
    LOOP
        EXECUTE format('DROP INDEX %s', old_index);
    END LOOP;
END
$$;
CREATE INDEX contacts_org_email ON contacts (org_id, email, id);
CREATE INDEX contacts_org_company ON contacts (org_id, company, id);
CREATE INDEX contacts_org_archived ON contacts (org_id, id) WHERE archived;
CREATE INDEX contacts_org_updated ON contacts (org_id, updated_at);

-- `GET /v1/activity`: each documented filter, per organisation, in the list's order
-- (newest first), so a page reads only matching rows however rare or common they are.
-- (org_id, entity_id, global_position DESC) and (org_id, global_position DESC) exist.
CREATE INDEX activity_org_action ON activity (org_id, action, global_position DESC);
CREATE INDEX activity_org_actor ON activity (org_id, actor_id, global_position DESC);
CREATE INDEX activity_org_entity_type ON activity (org_id, entity_type, global_position DESC);
-- since / until: the rows of a time window (then the newest of them first).
CREATE INDEX activity_org_occurred ON activity (org_id, occurred_at);

-- Snapshots are kept, not replaced: `GET /v1/contacts/{id}?as_of=T` starts from the
-- latest one whose last event was recorded at or before T, and the executor from the
-- latest of all. last_recorded_at is that event's recorded_at.
ALTER TABLE snapshots ADD COLUMN last_recorded_at timestamptz;
UPDATE snapshots s SET last_recorded_at = e.recorded_at
FROM events e
WHERE e.aggregate_type = s.aggregate_type AND e.aggregate_id = s.aggregate_id
  AND e.sequence = s.last_sequence;
-- A snapshot is a cache: one without its event (none should exist) is dropped.
DELETE FROM snapshots WHERE last_recorded_at IS NULL;
ALTER TABLE snapshots
    ALTER COLUMN last_recorded_at SET NOT NULL,
    DROP CONSTRAINT snapshots_pkey,
    ADD PRIMARY KEY (aggregate_type, aggregate_id, last_sequence);
