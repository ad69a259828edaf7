-- A BRIN index on `ts`: events arrive roughly in time order, so each block range covers a
-- narrow span of time and the index stays a few pages per partition. It lets Query's
-- time-sliced scans (search no other index narrows) read only the blocks of their slice, at
-- an ingest cost measured in BENCHMARKS.md ("Bounded search").
CREATE INDEX events_ts_brin_idx ON events USING brin (ts) WITH (pages_per_range = 32);
