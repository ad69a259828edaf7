#!/usr/bin/env bash
# Archiving on a throwaway PostgreSQL: ROWS bench-like events from ten days ago (8 services,
# 10,000 users) are moved by `sluice lifecycle --once` into zstd NDJSON objects under a temp
# dir. Prints the time, rows per second, and bytes in PostgreSQL, as NDJSON and as objects.
#   bench/archive.sh [ROWS]
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
rows=${1:-1000000}
ensure_postgres_binaries
cargo build --profile dist --features jemalloc --quiet
work=$(mktemp -d /tmp/sluice-archive-bench.XXXXXX)
trap 'stop_throwaway_postgres; rm -rf "$work"' EXIT
start_throwaway_postgres
psql() { command psql -X -q -v ON_ERROR_STOP=1 "$PG_URL" "$@"; }
cat >"$work/sluice.toml" <<TOML
[lifecycle]
enabled = false
[archive]
after = "7days"
url = "file://$work/archive"
TOML
lifecycle() {
  SLUICE_DATA_DIR="$work/data" RUST_LOG=warn target/dist/sluice lifecycle --once \
    --database-url "$PG_URL" --config "$work/sluice.toml"
}
echo "machine: $(nproc) cores, $(uname -sr), $(postgres --version)"
lifecycle >/dev/null # migrations and partitions
psql -c "INSERT INTO events (id, service, message, ts, user_id, metadata) \
  SELECT gen_random_uuid(), 'svc-' || (i % 8), 'GET /api/orders/' || i || ' 200 OK in ' || (i % 97) || ' ms', \
  date_trunc('day', now() - interval '10 days') + (i % 86400000) * interval '1 ms' * 80, 'user-' || (i % 10000), \
  jsonb_build_object('path', '/api/orders/' || i, 'status', 200, 'latencyMs', i % 97, 'region', 'eu-west-1') \
  FROM generate_series(1, $rows) i"
psql -c "VACUUM ANALYZE events"
hot=$(psql -At -c "SELECT sum(pg_total_relation_size(inhrelid)) FROM pg_inherits WHERE inhparent = 'events'::regclass")
ndjson=$(psql -At -c "SET TimeZone = 'UTC'; SELECT sum(octet_length(json_build_object('id', id, 'service', service, 'message', message, 'timestamp', ts, 'ingested_at', ingested_at, 'user_id', user_id, 'metadata', metadata)::text) + 1) FROM events")
start=$(date +%s.%N)
report=$(lifecycle)
end=$(date +%s.%N)
psql -At -c "SELECT 'archived ' || $(python3 -c 'import json,sys; print(json.load(sys.stdin)["rows_archived"])' <<<"$report") || ' rows into ' || count(*) || ' objects in ' || round(($end - $start)::numeric, 2) || ' s (' || round($rows / ($end - $start)::numeric) || ' rows/s); ' \
  || 'PostgreSQL (table + indexes) ' || pg_size_pretty($hot::bigint) || ' (' || round($hot::numeric / $rows) || ' B/event), ' \
  || 'NDJSON ' || pg_size_pretty($ndjson::bigint) || ' (' || round($ndjson::numeric / $rows) || ' B/event), ' \
  || 'archive ' || pg_size_pretty(sum(bytes)) || ' (' || round(sum(bytes)::numeric / $rows, 1) || ' B/event): ' \
  || round($ndjson::numeric / sum(bytes), 1) || 'x smaller than NDJSON, ' || round($hot::numeric / sum(bytes), 1) || 'x smaller than in PostgreSQL' FROM archives"
left=$(psql -At -c "SELECT count(*) FROM events")
echo "rows left in PostgreSQL: $left"
