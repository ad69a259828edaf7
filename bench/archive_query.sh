#!/usr/bin/env bash
# Query over both tiers, as a user waits for it: ROWS events over the last 14 days (8
# services, 10,000 users), queried with `sluice query` (a new process each time, TLS
# included) while every row is in PostgreSQL, then again after `sluice lifecycle --once` has
# moved the 7 oldest days into zstd objects. The first run of each shape after a restart is
# cold (objects fetched, checked and decoded); the next ones are served by the object cache.
#   bench/archive_query.sh [ROWS]          BENCH_BINARY=<release build> bench/archive_query.sh
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
rows=${1:-1000000}
runs=${RUNS:-5}
ensure_postgres_binaries
[ -n "${BENCH_BINARY:-}" ] || cargo build --profile dist --features jemalloc --quiet
binary=${BENCH_BINARY:-target/dist/sluice}
work=$(mktemp -d /tmp/sluice-archive-query.XXXXXX)
trap 'stop_release_server; stop_throwaway_postgres; rm -rf "$work"' EXIT
start_throwaway_postgres
psql() { command psql -X -q -v ON_ERROR_STOP=1 "$PG_URL" "$@"; }
export BENCH_CONFIG="$work/sluice.toml"
cat >"$BENCH_CONFIG" <<TOML
[lifecycle]
enabled = false
[archive]
after = "7days"
url = "file://$work/archive"
[search]
index_closed_partitions = false
TOML
echo "machine: $(nproc) cores, $(uname -sr), $(postgres --version)"
SLUICE_DATA_DIR="$work/data" RUST_LOG=warn "$binary" lifecycle --once \
  --database-url "$PG_URL" --config "$BENCH_CONFIG" >/dev/null # migrations and partitions
psql -c "INSERT INTO events (id, service, message, ts, user_id, metadata) \
  SELECT gen_random_uuid(), 'svc-' || (i % 8), 'GET /api/orders/' || i || ' 200 OK in ' || (i % 97) || ' ms', \
  now() - interval '14 days' + (i::float8 / $rows) * interval '14 days' - interval '1 minute', 'user-' || (i % 10000), \
  jsonb_build_object('path', '/api/orders/' || i, 'status', 200, 'latencyMs', i % 97, 'region', 'eu-west-1') \
  FROM generate_series(1, $rows) i"
psql -c "VACUUM ANALYZE events"
rare=$((rows / 5 + 7)) # an order in the archived days

# Each shape: a name and its `sluice query` arguments.
shapes=(
  "service, newest 100 (hot)|--service svc-3 --limit 100"
  "service, oldest 100 (archived)|--service svc-3 --oldest-first --limit 100"
  "one user, every event|--user-id user-42 --limit 1000 --all"
  "rare message, all services, complete|--message-contains /api/orders/$rare --limit 10 --all"
)
query() {
  local args=$1
  # shellcheck disable=SC2046,SC2086
  "$binary" query $(release_server_client_flags) $args >"$work/out.ndjson"
}
measure() {
  local label=$1
  start_release_server "$PG_URL"
  echo "$label"
  for shape in "${shapes[@]}"; do
    local name=${shape%%|*} args=${shape#*|} times=()
    for run in $(seq 1 "$runs"); do
      local start end
      start=$(date +%s%N)
      query "$args"
      end=$(date +%s%N)
      times+=($(((end - start) / 1000000)))
    done
    local found
    found=$(grep -c '"id"' "$work/out.ndjson" || true)
    local sorted
    sorted=$(printf '%s\n' "${times[@]:1}" | sort -n | tr '\n' ' ')
    printf '  %-40s found %6s  first %5s ms  then %s ms\n' "$name" "$found" "${times[0]}" "$sorted"
  done
  stop_release_server
}
measure "every row in PostgreSQL:"
start=$(date +%s.%N)
SLUICE_DATA_DIR="$work/data" RUST_LOG=warn "$binary" lifecycle --once \
  --database-url "$PG_URL" --config "$BENCH_CONFIG" >"$work/report.json"
end=$(date +%s.%N)
psql -At -c "SELECT 'archived ' || sum(rows) || ' events into ' || count(*) || ' objects (' || pg_size_pretty(sum(bytes)) || ') in ' || round(($end - $start)::numeric, 1) || ' s; ' || (SELECT count(*) FROM events) || ' rows left in PostgreSQL' FROM archives"
measure "7 of 14 days archived:"
