#!/usr/bin/env bash
# Search on the read side: loads ROWS events as bench/query.sh does (default 10M over 28 days),
# then for each phase restarts sluice with some search options, waits for the server to build
# their indexes (the closed partitions' by default; the optional whole-table ones with CREATE
# INDEX CONCURRENTLY, partition by partition), prints their build time and size, and runs
# `sluice bench-query`: per-call percentiles, then the time to the complete answer of each
# search shape (every page until `limit` events or no token) with its calls. Ingest cost is
# measured with bench/run.sh (see BENCHMARKS.md).
#   bench/search.sh [bench-query flags]        ROWS=1000000 bench/search.sh --iterations 50
#   SEARCH_PHASES="none unindexed" bench/search.sh  # the defaults, then without closed indexes
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

rows=${ROWS:-10000000}
ensure_postgres_binaries
# BENCH_BINARY: a server binary built already (else the dist profile is built here).
[ -n "${BENCH_BINARY:-}" ] || cargo build --profile dist --features jemalloc --quiet
config=$(mktemp /tmp/sluice-search.XXXXXX.toml)
cleanup() {
  stop_release_server
  stop_throwaway_postgres
  rm -f "$config"
}
trap cleanup EXIT
start_throwaway_postgres -c shared_buffers=1GB -c maintenance_work_mem=512MB -c max_wal_size=4GB
# The loading server builds no index: each phase's server does, and reports the time.
printf '[search]\nindex_closed_partitions = false\n' >"$config"
BENCH_CONFIG=$config start_release_server "$PG_URL"
load_query_rows "$rows"
psql_at() { psql -X -q -At -v ON_ERROR_STOP=1 "$PG_URL" -c "$1"; }
echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB, $(uname -sr), $(postgres --version)"
echo "rows: $(psql_at 'SELECT count(*) FROM events') in $(psql_at "SELECT count(*) FROM pg_inherits WHERE inhparent = 'events'::regclass") partitions"
bench_query() {
  # shellcheck disable=SC2046
  "${BENCH_BINARY:-target/dist/sluice}" bench-query $(release_server_client_flags) --server-pid "$SLUICE_PID" "$@"
}
# Closed partitions holding rows that lack a valid closed-partition index named <partition>$1.
unindexed_closed() {
  psql_at "SELECT count(*) FROM pg_inherits h JOIN pg_class p ON p.oid = h.inhrelid
    WHERE h.inhparent = 'events'::regclass AND p.reltuples > 0
    AND (regexp_match(pg_get_expr(p.relpartbound, p.oid), 'TO \(''([^'']+)''\)'))[1]::timestamptz
        <= now() - interval '1 hour'
    AND NOT EXISTS (SELECT 1 FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
      WHERE i.indrelid = p.oid AND c.relname = p.relname || '$1' AND i.indisvalid)"
}
# Each phase restarts sluice with some of the search options (the server drops the indexes of
# the last phase and builds its own), then runs bench-query. SEARCH_PHASES lists the phases,
# each a `+`-joined set of message, metadata, keys (the optional whole-table indexes),
# unindexed (no closed-partition indexes), or `none` (the defaults).
phases=${SEARCH_PHASES:-none unindexed}
for phase in $phases; do
  options=${phase//+/ }
  [ "$options" = none ] && options=
  whole_table=0
  {
    echo "[search]"
    for option in $options; do
      case $option in
        message) echo "message_index = true"; whole_table=$((whole_table + 1)) ;;
        metadata) echo "metadata_index = true"; whole_table=$((whole_table + 1)) ;;
        keys) echo 'indexed_metadata_keys = ["region"]'; whole_table=$((whole_table + 1)) ;;
        unindexed) echo "index_closed_partitions = false" ;;
        *) echo "unknown search option $option" >&2; exit 2 ;;
      esac
    done
  } >"$config"
  stop_release_server
  started=$(date +%s)
  BENCH_CONFIG=$config start_release_server "$PG_URL"
  until [ "$(psql_at "SELECT count(*) FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
      WHERE i.indrelid = 'events'::regclass AND c.relname LIKE 'events\_search\_%' AND i.indisvalid")" = "$whole_table" ]; do
    grep -q "cannot build or drop the search indexes" "$SLUICE_WORK/server.log" && { cat "$SLUICE_WORK/server.log" >&2; exit 1; }
    sleep 2
  done
  if [[ " $options " != *" unindexed "* ]]; then
    until [ "$(unindexed_closed _msg_trgm)" = 0 ] && [ "$(unindexed_closed _meta_gin)" = 0 ]; do
      sleep 2
    done
  fi
  echo "=== phase: ${options:-the defaults}; indexes ready in $(( $(date +%s) - started )) s"
  grep "search index built" "$SLUICE_WORK/server.log" | sed 's/.*index=/  built: index=/' || true
  sed 's/\x1b\[[0-9;]*m//g' "$SLUICE_WORK/server.log" | grep "closed partition indexed" |
    sed -E 's/.*kind="?([a-z]+)"? seconds=([0-9.]+).*/\1 \2/' |
    awk '{n[$1]++; s[$1]+=$2} END {for (k in n) printf "  closed partitions indexed: %s, %d in %.1f s\n", k, n[k], s[k]}' || true
  psql_at "SELECT '  closed-partition indexes: ' || pg_size_pretty(coalesce(sum(pg_relation_size(c.oid)), 0))
    FROM pg_class c WHERE c.relname ~ '^events_p[0-9_]+_(msg_trgm|meta_gin)$'"
  psql_at "SELECT '  size: ' || i.relname || ' ' || pg_size_pretty(sum(pg_relation_size(h.inhrelid)))
    FROM pg_class i JOIN pg_inherits h ON h.inhparent = i.oid
    WHERE i.relname LIKE 'events\_search\_%' GROUP BY i.relname ORDER BY 1"
  bench_query "$@"
done
