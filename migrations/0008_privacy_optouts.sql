-- Users who opted out of tracking: their events are refused at ingest. `user_key` is the keyed
-- hash (privacy HMAC key) of the plain user id, never the id itself. `services` NULL: every
-- service.
CREATE TABLE privacy_optouts (
    user_key    text        PRIMARY KEY,
    services    text[],
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
