-- lz4 column compression (PostgreSQL 14+ built with lz4, as Debian's is) for the columns that
-- can be large: less CPU than the default pglz (BENCHMARKS.md, "Column compression"). It
-- applies to values PostgreSQL compresses at all (over ~2 KB), written from now on. A
-- partition does not inherit its parent's setting, so every existing partition is set here and
-- sluice copies the parent's setting onto each partition it creates. Servers without lz4 keep
-- pglz.
DO $$
DECLARE
    partition regclass;
BEGIN
    ALTER TABLE events ALTER COLUMN metadata SET COMPRESSION lz4;
    ALTER TABLE events ALTER COLUMN message SET COMPRESSION lz4;
    ALTER TABLE dead_letters ALTER COLUMN raw SET COMPRESSION lz4;
    FOR partition IN SELECT inhrelid::regclass FROM pg_inherits WHERE inhparent = 'events'::regclass
    LOOP
        EXECUTE format('ALTER TABLE %s ALTER COLUMN metadata SET COMPRESSION lz4, '
                       'ALTER COLUMN message SET COMPRESSION lz4', partition);
    END LOOP;
EXCEPTION WHEN feature_not_supported OR invalid_parameter_value OR syntax_error THEN
    RAISE NOTICE 'lz4 column compression is not available here; keeping pglz';
END
$$;
