-- The archive: events older than `archive.after` leave `events` for objects in an object store
-- (one or more per service per day). Every event lives in exactly one place: a row of `events`
-- or a line of one archived object.

-- One row per archived object. `path` is the key under the configured `archive.url`; `uri` is
-- where it was written, for people.
CREATE TABLE archives (
    id          bigserial   PRIMARY KEY,
    path        text        NOT NULL UNIQUE,
    uri         text        NOT NULL,
    service     text        NOT NULL,
    day         date        NOT NULL,
    part        integer     NOT NULL,
    min_ts      timestamptz NOT NULL,
    max_ts      timestamptz NOT NULL,
    rows        bigint      NOT NULL,
    bytes       bigint      NOT NULL,
    sha256      text        NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    UNIQUE (service, day, part)
);
CREATE INDEX archives_max_ts_idx ON archives (max_ts);

-- Which users have events in which object, and how many: Delete and Export by user read only
-- the objects that hold that user.
CREATE TABLE archive_users (
    user_id     text   NOT NULL,
    archive_id  bigint NOT NULL REFERENCES archives (id) ON DELETE CASCADE,
    events      bigint NOT NULL,
    PRIMARY KEY (user_id, archive_id)
);
CREATE INDEX archive_users_archive_idx ON archive_users (archive_id);

-- Objects to remove from the store: written but never recorded (a run that died), or replaced
-- by a rewrite. Recorded before the object is written (or in the transaction that replaces
-- it), removed once the object is gone.
CREATE TABLE archive_garbage (
    path   text        PRIMARY KEY,
    since  timestamptz NOT NULL DEFAULT now()
);

-- Time ranges brought back by Restore: the lifecycle job leaves them in `events` until `until`.
CREATE TABLE archive_holds (
    id        bigserial   PRIMARY KEY,
    services  text[],
    start_ts  timestamptz NOT NULL,
    end_ts    timestamptz NOT NULL,
    until     timestamptz NOT NULL
);

ALTER TABLE lifecycle_runs
    ADD COLUMN rows_archived     bigint NOT NULL DEFAULT 0,
    ADD COLUMN objects_written   bigint NOT NULL DEFAULT 0,
    ADD COLUMN objects_deleted   bigint NOT NULL DEFAULT 0;
