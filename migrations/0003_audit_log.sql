-- Append-only access log: every Query, Export, Delete and Stats, every refusal on
-- authentication or permission (authentication failures aggregated per peer per minute), and
-- every policy reload.
CREATE TABLE audit_log (
    id        bigserial PRIMARY KEY,
    at        timestamptz NOT NULL DEFAULT now(),
    principal text NOT NULL,
    rpc       text NOT NULL,
    code      text NOT NULL,
    details   jsonb NOT NULL DEFAULT '{}'
);
CREATE INDEX audit_log_at ON audit_log (at);
CREATE INDEX audit_log_principal_at ON audit_log (principal, at);

-- How long rows are kept (auth.audit_retention; sluice sets it at start).
CREATE TABLE audit_settings (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    retention interval NOT NULL DEFAULT '365 days' CHECK (retention >= interval '1 day')
);
INSERT INTO audit_settings DEFAULT VALUES;

-- A change of the retention is itself logged, so it cannot be used quietly to open a window
-- for deleting recent rows.
CREATE FUNCTION audit_settings_logged() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.retention IS DISTINCT FROM OLD.retention THEN
        INSERT INTO audit_log (principal, rpc, code, details)
        VALUES ('(database)', 'AuditRetention', 'OK',
                jsonb_build_object('from', OLD.retention::text, 'to', NEW.retention::text,
                                   'by', current_user));
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER audit_settings_logged AFTER UPDATE ON audit_settings
    FOR EACH ROW EXECUTE FUNCTION audit_settings_logged();

-- Rows are never updated, and deleted only once older than the retention: not even the
-- table's owner can quietly edit the log (dropping the trigger is itself a visible act).
CREATE FUNCTION audit_log_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' AND OLD.at < now() - (SELECT retention FROM audit_settings) THEN
        RETURN OLD;
    END IF;
    RAISE EXCEPTION 'audit_log is append-only (% refused)', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END
$$;
CREATE TRIGGER audit_log_append_only BEFORE UPDATE OR DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION audit_log_append_only();
CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION audit_log_append_only();
