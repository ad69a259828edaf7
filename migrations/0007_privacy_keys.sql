-- Fingerprints (never the keys) of the privacy keys data was written under: the server refuses
-- to start with a key file that lacks or changed one of them, instead of writing data under a
-- new key that leaves the old data unreachable.
CREATE TABLE privacy_keys (
    kind        text        NOT NULL,  -- 'hmac' or 'encryption'
    key_id      text        NOT NULL,  -- '' for the HMAC key
    fingerprint text        NOT NULL,
    first_used  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (kind, key_id)
);
