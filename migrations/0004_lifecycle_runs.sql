-- One row per run of the lifecycle job (retention), successful or not.
CREATE TABLE lifecycle_runs (
    id                   bigserial PRIMARY KEY,
    started_at           timestamptz NOT NULL,
    finished_at          timestamptz NOT NULL DEFAULT now(),
    status               text NOT NULL,
    rows_deleted         bigint NOT NULL DEFAULT 0,
    partitions_dropped   text[] NOT NULL DEFAULT '{}',
    counts_deleted       bigint NOT NULL DEFAULT 0,
    dead_letters_deleted bigint NOT NULL DEFAULT 0,
    error                text
);
CREATE INDEX lifecycle_runs_started_at ON lifecycle_runs (started_at);
