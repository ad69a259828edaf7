-- Erasures (Delete, Anonymize) that every writer applies to what it writes, on every node:
-- an event admitted before an erasure's call ended is erased however it reaches PostgreSQL
-- later (another node's spool, the broker, a quarantined segment put back). `finished_at` is
-- NULL while the call runs: then every write it covers is erased.
CREATE TABLE erasures (
    id bigserial PRIMARY KEY,
    kind text NOT NULL CHECK (kind IN ('delete', 'anonymize')),
    -- In stored form (pseudonymized when privacy.pseudonymize_user_id is on).
    user_id text,
    -- Only these services; empty: any.
    services text[] NOT NULL DEFAULT '{}',
    -- The erasing caller's service globs; NULL: every service.
    service_globs text[],
    start_ts timestamptz,
    end_ts timestamptz,
    -- Anonymize: the user's new pseudonym.
    pseudonym text,
    started_at timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz
);
CREATE INDEX erasures_finished_at_idx ON erasures (finished_at);

-- The erasures that reach events admitted at `admitted` (every one when it is NULL), read
-- after taking the erasure lock for the caller's transaction, in a snapshot of their own: an
-- erasure recorded meanwhile waits for the transaction (it takes the lock exclusively), and
-- one recorded before is seen. `margin` covers the nodes' clocks disagreeing.
CREATE FUNCTION sluice_erasures_reaching(admitted timestamptz, margin interval)
RETURNS SETOF erasures LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    PERFORM pg_advisory_xact_lock_shared(hashtext('sluice.erasures'));
    RETURN QUERY SELECT * FROM erasures
        WHERE finished_at IS NULL OR admitted IS NULL OR finished_at + margin > admitted;
END
$$;
