#!/usr/bin/env bash
# Bytes per row and insert time of event metadata under pglz (PostgreSQL's default) and lz4
# (migration 0005), on a throwaway PostgreSQL. Two data sets: the bench's typical ~100-byte
# metadata, and 4 KB metadata documents (the size where PostgreSQL starts compressing).
#   bench/compression.sh [ROWS]
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
rows=${1:-100000}
ensure_postgres_binaries
trap stop_throwaway_postgres EXIT
start_throwaway_postgres
psql() { command psql -X -q -v ON_ERROR_STOP=1 "$PG_URL" "$@"; }
echo "machine: $(nproc) cores, $(uname -sr), $(postgres --version)"
for size in small large; do
  if [ "$size" = small ]; then
    doc="jsonb_build_object('path', '/api/orders/' || i, 'status', 200, 'latencyMs', i % 97, 'region', 'eu-west-1')"
  else
    doc="(SELECT jsonb_object_agg('key' || k, 'value ' || (i + k) % 1000 || ' of a repetitive log field') FROM generate_series(1, 90) k)"
  fi
  for method in pglz lz4; do
    psql -c "SET client_min_messages = warning; DROP TABLE IF EXISTS c; CREATE TABLE c (id bigint, metadata jsonb COMPRESSION $method)"
    start=$(date +%s.%N)
    psql -c "INSERT INTO c SELECT i, $doc FROM generate_series(1, $rows) i"
    end=$(date +%s.%N)
    psql -At -c "SELECT '$size metadata, $method: ' || round(avg(pg_column_size(metadata))) || ' B/value stored (' || round(avg(octet_length(metadata::text))) || ' B as text), table ' || pg_size_pretty(pg_total_relation_size('c')) || ', ' || round(pg_total_relation_size('c')::numeric / $rows) || ' B/row, insert ' || round(($end - $start)::numeric, 2) || ' s' FROM c"
  done
done
