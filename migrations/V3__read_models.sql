-- Read models. Each is owned by one projection and rebuilt from the events alone.

CREATE TABLE contacts (
    org_id      uuid        NOT NULL,
    id          uuid        NOT NULL,
    version     bigint      NOT NULL,
    profile     jsonb       NOT NULL,
    archived    boolean     NOT NULL,
    created_at  timestamptz NOT NULL,
    updated_at  timestamptz NOT NULL,
    last_position bigint    NOT NULL,
    email       text GENERATED ALWAYS AS (lower(profile->>'email')) STORED,
    company     text GENERATED ALWAYS AS (profile->>'company') STORED,
    search_text text GENERATED ALWAYS AS (lower(
        coalesce(profile->>'given_name', '') || ' ' || coalesce(profile->>'family_name', '')
        || ' ' || coalesce(profile->>'email', '') || ' ' || coalesce(profile->>'company', '')
    )) STORED,
    PRIMARY KEY (org_id, id)
);
CREATE INDEX contacts_org_email ON contacts (org_id, email);
CREATE INDEX contacts_org_company ON contacts (org_id, company);

CREATE TABLE activity (
    org_id         uuid        NOT NULL,
    event_id       uuid        NOT NULL,
    global_position bigint     NOT NULL,
    occurred_at    timestamptz NOT NULL,
    recorded_at    timestamptz NOT NULL,
    actor_kind     text        NOT NULL,
    actor_id       text        NOT NULL,
    action         text        NOT NULL,
    entity_type    text        NOT NULL,
    entity_id      text        NOT NULL,
    request_id     text,
    correlation_id text,
    PRIMARY KEY (org_id, event_id)
);
CREATE INDEX activity_org_position ON activity (org_id, global_position DESC);
CREATE INDEX activity_org_entity ON activity (org_id, entity_id, global_position DESC);

GRANT SELECT, INSERT, UPDATE, DELETE ON contacts, activity TO crm_app;
