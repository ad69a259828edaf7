#!/usr/bin/env bash
# Read-side benchmark: loads ROWS synthetic events (default 10M, over the last 28 days, 8
# services, 50,000 users, in time order as ingest writes them, so that each block holds a
# narrow span of time as in production) into a throwaway PostgreSQL, starts a dist build (fat LTO) of sluice on it,
# prints the plans of the read queries, then runs `sluice bench-query` (Query, next page and
# Stats latency percentiles; Export of one service (about ROWS/8 events), of one whole day
# (about ROWS/28) and of one user, with the server's RSS and CPU per event).
#
#   bench/query.sh                 # 10,000,000 rows
#   ROWS=1000000 bench/query.sh
#   BENCH_BINARY=/tmp/sluice-a bench/query.sh   # a prebuilt binary (A/B runs of two builds)
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

rows=${ROWS:-10000000}
ensure_postgres_binaries
[ -n "${BENCH_BINARY:-}" ] || cargo build --profile dist --features jemalloc --quiet
cleanup() {
  stop_release_server
  stop_throwaway_postgres
}
trap cleanup EXIT
start_throwaway_postgres -c shared_buffers=1GB -c maintenance_work_mem=512MB -c max_wal_size=4GB
# The server makes the schema; it is stopped while the rows load, so that its upkeep (the
# indexes it builds on closed days) never meets the loader's VACUUM in a deadlock.
start_release_server "${BENCH_SERVER_DATABASE_URL:-$PG_URL}"
stop_release_server

psql_run() { psql -X -q -v ON_ERROR_STOP=1 "$PG_URL" "$@"; }
load_query_rows "$rows"
start_release_server "${BENCH_SERVER_DATABASE_URL:-$PG_URL}"
# Searches read closed days through their own indexes: wait until the server has built them
# all, as a server running since the days closed would have.
log "waiting for the closed days' search indexes"
for _ in $(seq 1 300); do
  sed 's/\x1b\[[0-9;]*m//g' "$SLUICE_WORK/server.log" | grep 'closed partition indexes updated' \
    | grep -qE 'unindexed=0( |$)|"unindexed":0[,}]' && break
  sleep 1
done

echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB, $(uname -sr), $(postgres --version)"
echo "rows: $(psql_run -At -c 'SELECT count(*) FROM events')"
echo "--- plan: one service over a 1-hour window"
psql_run -c "EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF, SUMMARY ON) SELECT id, service, message, ts, ingested_at, user_id, metadata FROM events
  WHERE service = 'svc-3' AND ts >= now() - interval '49 hours' AND ts < now() - interval '48 hours' ORDER BY ts DESC, id DESC LIMIT 101"
echo "--- plan: one user_id"
psql_run -c "EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF, SUMMARY ON) SELECT id, service, message, ts, ingested_at, user_id, metadata FROM events
  WHERE user_id = 'user-4242' ORDER BY ts DESC, id DESC LIMIT 101"
echo "--- plan: next page (keyset)"
psql_run -c "EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF, SUMMARY ON) SELECT id, service, message, ts, ingested_at, user_id, metadata FROM events
  WHERE service = 'svc-3' AND ts < now() - interval '100 hours' AND ts <= now() - interval '101 hours' AND (ts, id) < (now() - interval '101 hours', '00000000-0000-0000-0000-000000000000') ORDER BY ts DESC, id DESC LIMIT 101"
echo "--- plan: stats per service"
psql_run -c "EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF, SUMMARY ON) SELECT service, sum(events)::bigint, coalesce(sum(events) FILTER (WHERE hour >= now() - interval '23 hours'), 0)::bigint
  FROM event_counts GROUP BY service HAVING sum(events) > 0 ORDER BY 2 DESC, 1"

# shellcheck disable=SC2046
"${BENCH_BINARY:-target/dist/sluice}" bench-query $(release_server_client_flags) \
  --export-service svc-3 --server-pid "$SLUICE_PID" "$@"
echo "server peak RSS: $(awk '/VmHWM/ {printf "%.1f MiB", $2/1024}' /proc/$SLUICE_PID/status)"
