-- Every consent change stores its receipt. With the foreign key from
-- consent_receipts.kid to receipt_keys, each insert also locked the one signing key's
-- row (FOR KEY SHARE), so concurrent consent changes all took a shared lock on the
-- same row, which PostgreSQL records as a new multixact each time: the insert cost
-- more than the consent event it belongs to (docs/benchmarks.md, issue 12).
--
-- What the key guarded instead holds by the keys' own rule, now enforced for every
-- role (the table's owner too): a key is never deleted, and its kid and public key
-- never change, so every kid a receipt names stays in the JWKS with the key that
-- verifies it. (Retiring sets retired_at; a new key-encryption key may re-wrap the
-- private half.) Receipts name only the key that signed them, which the signer read
-- from this table (infra::receipts).
ALTER TABLE consent_receipts DROP CONSTRAINT consent_receipts_kid_fkey;

CREATE FUNCTION receipt_keys_are_kept() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE' AND NEW.kid = OLD.kid AND NEW.public_key = OLD.public_key THEN
        RETURN NEW;
    END IF;
    RAISE EXCEPTION 'receipt keys are kept: a key''s kid and public key never change and it is never deleted (% refused)', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END
$$;

CREATE TRIGGER receipt_keys_kept
    BEFORE UPDATE OR DELETE ON receipt_keys
    FOR EACH ROW EXECUTE FUNCTION receipt_keys_are_kept();
CREATE TRIGGER receipt_keys_not_truncated
    BEFORE TRUNCATE ON receipt_keys
    FOR EACH STATEMENT EXECUTE FUNCTION receipt_keys_are_kept();
