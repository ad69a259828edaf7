-- Per-service hourly event counts (by event time, UTC hours), kept by the writers in the same
-- transaction as each COPY and by Delete, so Stats never scans the events table. Each writer
-- counts into its own shard (Delete into shard -1, with negative counts), so concurrent
-- transactions never wait on each other's rows; a count is the sum over shards.
CREATE TABLE event_counts (
    service text        NOT NULL,
    hour    timestamptz NOT NULL,
    shard   smallint    NOT NULL,
    events  bigint      NOT NULL,
    PRIMARY KEY (service, hour, shard)
);

CREATE INDEX event_counts_hour_idx ON event_counts (hour);

INSERT INTO event_counts (service, hour, shard, events)
SELECT service, date_trunc('hour', ts, 'UTC'), 0, count(*) FROM events GROUP BY 1, 2;
