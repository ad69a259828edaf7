-- `ingested_at` is written by the server (`now()` at COPY) and only grows, yet it had a
-- B-tree that no query of sluice's uses: every row paid an index insert for it. A BRIN index
-- keeps ad-hoc "what arrived since" queries cheap at almost no ingest cost, as for `ts`
-- (BENCHMARKS.md, "Performance: as fast as a raw COPY").
DROP INDEX IF EXISTS events_ingested_at_idx;
CREATE INDEX events_ingested_at_brin_idx ON events USING brin (ingested_at) WITH (pages_per_range = 32);
