-- A user's events in time order: `(user_id, ts, id)` replaces the `(user_id)` index of 0001.
-- With daily partitions a lookup by user reads every partition; through this index each one
-- is an ordered walk, merged, that stops once the page is full, instead of every event of the
-- user fetched and sorted (BENCHMARKS.md, "A user's events in time order"). It serves every
-- `user_id =` (Query, Export, Delete, Anonymize) as the old one did.
--
-- On an empty table (a new install) both changes are made here at once. On a table that
-- holds events, building it here would block ingest for as long as the build takes, so only
-- the parent index is created here (`ON ONLY`: invalid, nothing read); the server then builds
-- it partition by partition with `CREATE INDEX CONCURRENTLY` in the background, attaches each
-- part, and drops the old index once this one is valid (store/core_indexes.rs).
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM events) THEN
        CREATE INDEX events_user_ts_idx ON ONLY events (user_id, ts, id)
            WHERE user_id IS NOT NULL;
    ELSE
        CREATE INDEX events_user_ts_idx ON events (user_id, ts, id) WHERE user_id IS NOT NULL;
        DROP INDEX events_user_id_idx;
    END IF;
END
$$;
