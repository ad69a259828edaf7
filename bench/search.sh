#!/usr/bin/env bash
# The optional search indexes (search.*) on the read side: loads ROWS events as bench/query.sh
# does (default 10M), runs `sluice bench-query` with the defaults, then restarts sluice with
# the search indexes of SEARCH_INDEXES on (default all: message metadata keys), times the
# server building them (CREATE INDEX CONCURRENTLY, partition by partition), prints their
# sizes, and runs bench-query again. Their ingest cost is measured
# with bench/run.sh (see BENCHMARKS.md).
#   bench/search.sh [bench-query flags]        ROWS=1000000 bench/search.sh --iterations 50
#   SEARCH_DEFAULTS_ONLY=1 bench/search.sh     # only the first phase
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

rows=${ROWS:-10000000}
ensure_postgres_binaries
cargo build --release --quiet
config=$(mktemp /tmp/sluice-search.XXXXXX.toml)
cleanup() {
  stop_release_server
  stop_throwaway_postgres
  rm -f "$config"
}
trap cleanup EXIT
start_throwaway_postgres -c shared_buffers=1GB -c maintenance_work_mem=512MB -c max_wal_size=4GB
start_release_server "$PG_URL"
load_query_rows "$rows"
psql_at() { psql -X -q -At -v ON_ERROR_STOP=1 "$PG_URL" -c "$1"; }
echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB, $(uname -sr), $(postgres --version)"
echo "rows: $(psql_at 'SELECT count(*) FROM events')"
bench_query() {
  # shellcheck disable=SC2046
  target/release/sluice bench-query $(release_server_client_flags) --server-pid "$SLUICE_PID" "$@"
}
echo "=== defaults (no search index)"
bench_query "$@"
[ -n "${SEARCH_DEFAULTS_ONLY:-}" ] && exit 0

stop_release_server
# SEARCH_INDEXES picks the options: any of message, metadata, keys (default: all three).
indexes=${SEARCH_INDEXES:-message metadata keys}
{
  echo "[search]"
  for option in $indexes; do
    case $option in
      message) echo "message_index = true" ;;
      metadata) echo "metadata_index = true" ;;
      keys) echo 'indexed_metadata_keys = ["region"]' ;;
    esac
  done
} >"$config"
started=$(date +%s)
BENCH_CONFIG=$config start_release_server "$PG_URL"
until [ "$(psql_at "SELECT count(*) FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
    WHERE i.indrelid = 'events'::regclass AND c.relname LIKE 'events\_search\_%' AND i.indisvalid")" = "$(wc -w <<<"$indexes")" ]; do
  grep -q "cannot build or drop the search indexes" "$SLUICE_WORK/server.log" && { cat "$SLUICE_WORK/server.log" >&2; exit 1; }
  sleep 2
done
echo "=== the server built the search indexes ($indexes) in $(( $(date +%s) - started )) s:"
grep "search index built" "$SLUICE_WORK/server.log" | sed 's/.*index=/  index=/'
psql_at "SELECT i.relname || ': ' || pg_size_pretty(sum(pg_relation_size(h.inhrelid)))
  FROM pg_class i JOIN pg_inherits h ON h.inhparent = i.oid
  WHERE i.relname LIKE 'events\_search\_%' GROUP BY i.relname ORDER BY 1"
echo "table with every index: $(psql_at "SELECT pg_size_pretty(sum(pg_total_relation_size(inhrelid))) FROM pg_inherits WHERE inhparent = 'events'::regclass")"
echo "=== with the search indexes: $indexes"
bench_query "$@"
