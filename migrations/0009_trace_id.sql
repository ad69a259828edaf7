-- The W3C trace id (32 lowercase hex digits) of the request that brought each event: the
-- caller's `traceparent`, or sluice's own sampled trace. NULL when the request had none (or
-- `telemetry.store_trace_id` is off). Adding a nullable column without a default rewrites
-- nothing. The partial index serves Query's `trace_id` filter and costs nothing for events
-- without a trace.
ALTER TABLE events ADD COLUMN trace_id text;
CREATE INDEX events_trace_id_idx ON events (trace_id) WHERE trace_id IS NOT NULL;
