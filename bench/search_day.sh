#!/usr/bin/env bash
# What one closed day's search step costs as the day grows: builds a day of 357k rows and one
# of 3.57M rows (10M and 100M rows over 28 days, as bench/query.sh writes them) in a
# throwaway PostgreSQL, indexes each as sluice indexes a closed partition (a trigram GIN on
# `message`, a GIN jsonb_path_ops on `metadata`), and prints the build times, the sizes, and
# the median execution time of the steps Query runs on a closed day, beside a scan of the
# whole day. The base for the 100M-row figures in BENCHMARKS.md ("Search that answers").
#   bench/search_day.sh
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
ensure_postgres_binaries
start_throwaway_postgres -c shared_buffers=1GB -c maintenance_work_mem=512MB -c max_wal_size=4GB
trap stop_throwaway_postgres EXIT
psql -X -q "$PG_URL" -c "CREATE EXTENSION pg_trgm"
for spec in "small 357143" "big 3571430"; do
  set -- $spec
  psql -X -q "$PG_URL" -c "CREATE TABLE day_$1 (id uuid, service text, message text, ts timestamptz, user_id text, metadata jsonb)" \
    -c "INSERT INTO day_$1 SELECT gen_random_uuid(), 'svc-' || (g % 8), 'GET /api/orders/' || g || ' -> 200 in ' || (g % 900) || ' ms', now() - interval '1 day' * g::float8 / $2, 'user-' || (g % 50000), jsonb_build_object('path', '/api/orders', 'status', 200, 'region', (ARRAY['eu','us','ap'])[1 + g % 3]) FROM generate_series(1, $2) g" \
    -c "VACUUM ANALYZE day_$1"
  start=$(date +%s.%N)
  psql -X -q "$PG_URL" -c "CREATE INDEX ON day_$1 USING gin (message gin_trgm_ops)"
  mid=$(date +%s.%N)
  psql -X -q "$PG_URL" -c "CREATE INDEX ON day_$1 USING gin (metadata jsonb_path_ops)"
  end=$(date +%s.%N)
  echo "$1 ($2 rows): trigram build $(echo "$mid - $start" | bc) s, metadata build $(echo "$end - $mid" | bc) s, table $(psql -X -At "$PG_URL" -c "select pg_size_pretty(pg_relation_size('day_$1'))"), indexes $(psql -X -At "$PG_URL" -c "select pg_size_pretty(pg_indexes_size('day_$1'))")"
  for needle in "/orders/1234567 -> " "-> 599 in" "orders/123456 "; do
    for i in 1 2 3 4 5; do
      psql -X -At "$PG_URL" -c "EXPLAIN (ANALYZE, TIMING OFF, SUMMARY ON) SELECT id, ts FROM day_$1 WHERE strpos(message, '$needle') > 0 AND message LIKE '%$needle%' ORDER BY ts DESC, id DESC LIMIT 11" | grep "Execution Time"
    done | sort -t: -k2 -n | sed -n 3p | sed "s|^|  $1 message '$needle' median of 5: |"
  done
  for i in 1 2 3 4 5; do
    psql -X -At "$PG_URL" -c "EXPLAIN (ANALYZE, TIMING OFF, SUMMARY ON) SELECT id, ts FROM day_$1 WHERE metadata @> '{\"status\":500}' ORDER BY ts DESC, id DESC LIMIT 11" | grep "Execution Time"
  done | sort -t: -k2 -n | sed -n 3p | sed "s|^|  $1 metadata no match median of 5: |"
  for i in 1 2 3; do
    psql -X -At "$PG_URL" -c "EXPLAIN (ANALYZE, TIMING OFF, SUMMARY ON) SELECT id, ts FROM day_$1 WHERE strpos(message, '-> 599 in') > 0 ORDER BY ts DESC, id DESC LIMIT 11" -c "SET max_parallel_workers_per_gather = 0" | grep "Execution Time"
  done | sort -t: -k2 -n | sed -n 2p | sed "s|^|  $1 full scan of the day (no index) median of 3: |"
done
