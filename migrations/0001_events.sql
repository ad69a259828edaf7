-- Events, partitioned by month on the event time. Partitions are created ahead by the server
-- (see src/store/partitions.rs); the primary key (id, ts) is the idempotency key.
CREATE TABLE events (
    id          uuid        NOT NULL,
    service     text        NOT NULL,
    message     text        NOT NULL,
    ts          timestamptz NOT NULL,
    ingested_at timestamptz NOT NULL DEFAULT now(),
    user_id     text,
    metadata    jsonb       NOT NULL DEFAULT '{}'::jsonb,
    PRIMARY KEY (id, ts)
) PARTITION BY RANGE (ts);

-- (service, ts, id) rather than (service, ts): the id makes it match the keyset order
-- (ts, id), so a page of one service is a bounded backward index scan, however deep.
CREATE INDEX events_service_ts_idx ON events (service, ts, id);
CREATE INDEX events_ingested_at_idx ON events (ingested_at);
CREATE INDEX events_user_id_idx ON events (user_id) WHERE user_id IS NOT NULL;

-- Events that passed validation but that PostgreSQL refused (bad-row isolation). `raw` is the
-- event as JSON bytes, kept as bytea so that even text PostgreSQL cannot store survives.
CREATE TABLE dead_letters (
    id          bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id    uuid        NOT NULL,
    ts          timestamptz NOT NULL,
    service     text        NOT NULL,
    user_id     text,
    raw         bytea       NOT NULL,
    error       text        NOT NULL,
    sqlstate    text,
    failed_at   timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX dead_letters_user_id_idx ON dead_letters (user_id) WHERE user_id IS NOT NULL;
-- One row per event: a batch retried after a partial failure does not dead-letter twice.
CREATE UNIQUE INDEX dead_letters_event_idx ON dead_letters (event_id, ts);
