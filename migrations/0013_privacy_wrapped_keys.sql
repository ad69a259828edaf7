-- Keys from a KMS (privacy.kms.key_id): each key is stored wrapped by the KMS key beside its
-- fingerprint, never in plaintext (NULL for keys that live in a key file), with the order in
-- which encryption keys came (the last one encrypts new values).
ALTER TABLE privacy_keys
    ADD COLUMN wrapped    bytea,
    ADD COLUMN wrapped_by text,
    ADD COLUMN ordinal    integer;
