#!/usr/bin/env bash
# The optional search indexes (search.*) on the read side: loads ROWS events as bench/query.sh
# does (default 10M), then for each phase restarts sluice with some search options, times the
# server building their indexes (CREATE INDEX CONCURRENTLY, partition by partition), prints
# their sizes and runs `sluice bench-query`. Their ingest cost is measured
# with bench/run.sh (see BENCHMARKS.md).
#   bench/search.sh [bench-query flags]        ROWS=1000000 bench/search.sh --iterations 50
#   SEARCH_PHASES="none keys" bench/search.sh  # the defaults, then the key index alone
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

rows=${ROWS:-10000000}
ensure_postgres_binaries
cargo build --profile dist --features jemalloc --quiet
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
  target/dist/sluice bench-query $(release_server_client_flags) --server-pid "$SLUICE_PID" "$@"
}
# Each phase restarts sluice with some of the search options (the server drops the indexes of
# the last phase and builds its own), then runs bench-query. SEARCH_PHASES lists the phases,
# each a `+`-joined set of message, metadata, keys, or `none` (the defaults).
phases=${SEARCH_PHASES:-none keys metadata message message+metadata+keys}
for phase in $phases; do
  options=${phase//+/ }
  [ "$options" = none ] && options=
  {
    echo "[search]"
    for option in $options; do
      case $option in
        message) echo "message_index = true" ;;
        metadata) echo "metadata_index = true" ;;
        keys) echo 'indexed_metadata_keys = ["region"]' ;;
        *) echo "unknown search option $option" >&2; exit 2 ;;
      esac
    done
  } >"$config"
  stop_release_server
  started=$(date +%s)
  BENCH_CONFIG=$config start_release_server "$PG_URL"
  wanted=$(wc -w <<<"$options")
  until [ "$(psql_at "SELECT count(*) FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
      WHERE i.indrelid = 'events'::regclass AND c.relname LIKE 'events\_search\_%' AND i.indisvalid")" = "$wanted" ]; do
    grep -q "cannot build or drop the search indexes" "$SLUICE_WORK/server.log" && { cat "$SLUICE_WORK/server.log" >&2; exit 1; }
    sleep 2
  done
  echo "=== phase: ${options:-no search index (the defaults)}; indexes ready in $(( $(date +%s) - started )) s"
  grep "search index built" "$SLUICE_WORK/server.log" | sed 's/.*index=/  built: index=/' || true
  psql_at "SELECT '  size: ' || i.relname || ' ' || pg_size_pretty(sum(pg_relation_size(h.inhrelid)))
    FROM pg_class i JOIN pg_inherits h ON h.inhparent = i.oid
    WHERE i.relname LIKE 'events\_search\_%' GROUP BY i.relname ORDER BY 1"
  bench_query "$@"
done
