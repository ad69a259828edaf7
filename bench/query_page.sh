#!/usr/bin/env bash
# Query page benchmark: loads ROWS (default 20,000) events of service `wide`, each with about
# 4 KiB of metadata (64 entries: strings, numbers, small objects and lists), into a throwaway
# PostgreSQL, starts a dist build of sluice on it with pages allowed up to 16 MiB, and asks
# ITERATIONS times (default 200) for the newest PAGE events (default 1,000): latency
# percentiles and the server's CPU per page and per event (`sluice bench-query --page-service`).
#
#   bench/query_page.sh
#   BENCH_BINARY="/tmp/sluice-a /tmp/sluice-b" ROUNDS=3 bench/query_page.sh   # A/B, interleaved
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

rows=${ROWS:-20000}
page=${PAGE:-1000}
iterations=${ITERATIONS:-200}
binaries=${BENCH_BINARY:-target/dist/sluice}
ensure_postgres_binaries
[ -n "${BENCH_BINARY:-}" ] || cargo build --profile dist --features jemalloc --quiet
config=$(mktemp /tmp/sluice-page-config.XXXXXX)
cleanup() {
  stop_release_server
  stop_throwaway_postgres
  rm -f "$config"
}
trap cleanup EXIT
printf '[reads]\nmax_response_bytes = %d\n' $((16 * 1024 * 1024)) >"$config"
export BENCH_CONFIG=$config
start_throwaway_postgres -c shared_buffers=1GB
first=${binaries%% *}
BENCH_BINARY=$first start_release_server "$PG_URL"
stop_release_server
log "loading $rows wide rows"
psql -X -q -v ON_ERROR_STOP=1 "$PG_URL" -c "
  INSERT INTO events (id, service, message, ts, user_id, metadata)
  SELECT gen_random_uuid(), 'wide', 'GET /api/orders/' || g || ' -> 200 in ' || (g % 900) || ' ms',
         now() - interval '1 hour' * ($rows - g)::float8 / $rows, 'user-' || (g % 5000),
         (SELECT jsonb_object_agg('attribute_' || k, CASE k % 4
                   WHEN 0 THEN to_jsonb(md5(g::text || k) || md5(k::text))
                   WHEN 1 THEN to_jsonb(g * k * 0.25)
                   WHEN 2 THEN jsonb_build_object('name', md5(k::text), 'count', k, 'ok', true)
                   ELSE jsonb_build_array(md5(g::text), k, false) END)
            FROM generate_series(1, 64) AS k)
  FROM generate_series(1, $rows) AS g" -c "VACUUM ANALYZE events"

echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB, $(uname -sr), $(postgres --version)"
echo "rows: $(psql -X -At "$PG_URL" -c "SELECT count(*) || ', metadata ' || round(avg(octet_length(metadata::text))) || ' bytes on average' FROM events")"
for round in $(seq 1 "${ROUNDS:-1}"); do
  for binary in $binaries; do
    BENCH_BINARY=$binary start_release_server "$PG_URL"
    echo "== $binary (round $round)"
    # shellcheck disable=SC2046
    "$binary" bench-query $(release_server_client_flags) --only none --answers 0 \
      --page-service wide --page-events "$page" --iterations "$iterations" --server-pid "$SLUICE_PID"
    stop_release_server
  done
done
