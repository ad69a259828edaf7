-- Per-service hourly event counts (by event time, UTC hours), kept by the writers in the same
-- transaction as each COPY and by Delete, so Stats never scans the events table.
CREATE TABLE event_counts (
    service text        NOT NULL,
    hour    timestamptz NOT NULL,
    events  bigint      NOT NULL,
    PRIMARY KEY (service, hour)
);

CREATE INDEX event_counts_hour_idx ON event_counts (hour);

INSERT INTO event_counts (service, hour, events)
SELECT service, date_trunc('hour', ts, 'UTC'), count(*) FROM events GROUP BY 1, 2;
