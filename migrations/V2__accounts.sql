-- Login credentials: mutable and erasable, so never inside an event.
CREATE TABLE credentials (
    user_id       uuid PRIMARY KEY,
    org_id        uuid        NOT NULL,
    email_lower   text        NOT NULL UNIQUE,
    password_hash text        NOT NULL,
    active        boolean     NOT NULL DEFAULT true,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now()
);

GRANT SELECT, INSERT, UPDATE, DELETE ON credentials TO crm_app;
