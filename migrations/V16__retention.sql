-- Retention (issue 14): an organisation's period lives in its privacy settings
-- (`privacy_settings.settings ->> 'retention_days'`); a contact's own period, set by
-- its `RetentionPeriodSet` events, is kept here by the command's transaction (as the
-- access tables are), for the retention sweep to find in one query.
CREATE TABLE contact_retention (
    org_id     uuid    NOT NULL,
    contact_id uuid    NOT NULL,
    days       integer NOT NULL CHECK (days > 0),
    PRIMARY KEY (org_id, contact_id)
);
GRANT SELECT, INSERT, UPDATE, DELETE ON contact_retention TO crm_app;
