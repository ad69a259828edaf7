-- The seed's business figures, per service and UTC hour of receipt, for Stats over a window
-- the caller chooses: what was accepted and how big it was, how fast it was acknowledged, and
-- what was rejected and why. Each node adds what it counted every `metrics.figures_interval`;
-- the lifecycle job drops hours past the longest retention.
CREATE TABLE ingest_figures (
    service            text        NOT NULL,
    hour               timestamptz NOT NULL,
    -- Events stored (acknowledged as durable).
    accepted           bigint      NOT NULL DEFAULT 0,
    -- By size (message + metadata): under 1 KiB, 1 to 10 KiB, over 10 KiB.
    size_small         bigint      NOT NULL DEFAULT 0,
    size_medium        bigint      NOT NULL DEFAULT 0,
    size_large         bigint      NOT NULL DEFAULT 0,
    -- Requests holding events of this service, by ack latency bucket (see figures::BOUNDS_US).
    ack_buckets        bigint[]    NOT NULL,
    -- Per event, admission to commit.
    processing_sum_us  bigint      NOT NULL DEFAULT 0,
    processing_max_us  bigint      NOT NULL DEFAULT 0,
    PRIMARY KEY (service, hour)
);
CREATE INDEX ingest_figures_hour_idx ON ingest_figures (hour);

CREATE TABLE ingest_rejections (
    service  text        NOT NULL,
    hour     timestamptz NOT NULL,
    reason   text        NOT NULL,
    events   bigint      NOT NULL,
    PRIMARY KEY (service, hour, reason)
);
CREATE INDEX ingest_rejections_hour_idx ON ingest_rejections (hour);

-- The trace ids of each archived object as a Bloom filter (archive/bloom.rs): a Query by
-- trace id reads only the objects that may hold it. NULL for objects archived before: read.
ALTER TABLE archives ADD COLUMN trace_bloom bytea;
