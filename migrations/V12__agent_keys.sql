-- AI agents are principals of their own (issue 13): an agent's credential is an API
-- key of kind `agent`, registered by a user. What it may do is capped, at every
-- request, by what that user may do then (a demoted or deactivated user's agents lose
-- the same rights at once).
ALTER TABLE api_keys
    ADD COLUMN kind text NOT NULL DEFAULT 'integration'
        CHECK (kind IN ('integration', 'agent')),
    ADD COLUMN registered_by uuid,
    ADD CONSTRAINT api_keys_agent_has_a_user
        CHECK ((kind = 'agent') = (registered_by IS NOT NULL));
