#!/usr/bin/env bash
# End-to-end benchmark on this machine: a throwaway PostgreSQL with default (durable) settings,
# a dist build (fat LTO) of sluice over mTLS, then `sluice bench`, which measures the raw binary COPY
# ceiling of the same database, PostgreSQL's own load of the same rows from local files
# (server-side COPY, binary and text), and sluice's ingest rate, and prints the ratios.
#
#   bench/run.sh                          # defaults: 200k events, 8 streams, 500 events/request
#   bench/run.sh --events 500000 --streams 16
#   bench/run.sh --ceiling-batch 5000     # the stronger ceiling: 5,000-row COPY transactions
#   BENCH_BINARY=/tmp/sluice-a bench/run.sh # a prebuilt binary (A/B runs of two builds)
#   bench/run.sh --otlp                   # then the same events as OTLP logs (LogsService/Export):
#                                         # events/s and CPU per event against the native path
#   bench/run.sh --redis                  # direct mode, then Redis mode with 1 ingest + 1 writer
#                                         # node, then 2 + 2, all in one run (see BENCHMARKS.md)
#   bench/run.sh --redis-cluster          # direct mode, then 2 ingest + 2 writer nodes through a
#                                         # 3-master Redis Cluster (3 replicas), in one run
#
# Server settings can be varied through SLUICE_* variables, e.g.
#   SLUICE_WRITER__BATCH_MAX_EVENTS=1000 bench/run.sh
# and an index's ingest cost measured by dropping it first:
#   BENCH_DROP_INDEXES=events_ts_brin_idx bench/run.sh
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

redis=0
if [ "${1:-}" = "--redis" ]; then
  redis=1
  shift
elif [ "${1:-}" = "--redis-cluster" ]; then
  redis=cluster
  shift
fi

start_bench_environment
[ "${BENCH_UNIX_SOCKET:-0}" = 1 ] && BENCH_SERVER_DATABASE_URL=$PG_SOCKET_URL
DATABASE=${BENCH_SERVER_DATABASE_URL:-$PG_URL}
echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB, $(uname -sr), $(postgres --version)"

if [ "$redis" = 0 ]; then
  start_release_server "$DATABASE"
  # For A/B runs of an index's ingest cost: BENCH_DROP_INDEXES="events_ts_brin_idx ..."
  for index in ${BENCH_DROP_INDEXES:-}; do
    psql -X -q -v ON_ERROR_STOP=1 "$PG_URL" -c "DROP INDEX $index"
    echo "dropped index $index"
  done
  # shellcheck disable=SC2046
  "${BENCH_BINARY:-target/dist/sluice}" bench $(release_server_client_flags) \
    --database-url "$PG_URL" --server-pid "$SLUICE_PID" --reset-table --file-ceiling "$@"
  exit 0
fi

# --- Redis mode, compared with direct mode in the same run ----------------------------------
if [ "$redis" = cluster ]; then
  start_throwaway_redis_cluster
else
  start_throwaway_redis
fi
echo "redis: $(redis-server --version | awk '{print $3}'), appendonly yes, appendfsync always"
client_flags() {
  echo --addr "https://localhost:$1" --ca "$SLUICE_WORK/certs/ca.pem" \
    --cert "$SLUICE_WORK/certs/client.pem" --key "$SLUICE_WORK/certs/client.key"
}
# Runs one `sluice bench` against the given ingest ports; prints its report and keeps the
# end-to-end rate (every acknowledged event in PostgreSQL) in RATE.
measure() {
  local label=$1 first=$2
  shift 2
  local extra=()
  for port in "$@"; do extra+=(--extra-addr "https://localhost:$port"); done
  echo "=== $label"
  # shellcheck disable=SC2046
  "${BENCH_BINARY:-target/dist/sluice}" bench $(client_flags "$first") "${extra[@]}" \
    --database-url "$PG_URL" --reset-table --wait-stored "${BENCH_ARGS[@]}" | tee "$SLUICE_WORK/report"
  RATE=$(awk '/^stored end to end:/ {print $5}' "$SLUICE_WORK/report")
}
BENCH_ARGS=("$@")

start_release_node direct "$DATABASE"
measure "direct mode (one node)" "$NODE_PORT"
direct=$RATE
stop_release_nodes

redis_node() {
  SLUICE_REDIS__URL=$REDIS_URL start_release_node "$@"
}

if [ "$redis" = cluster ]; then
  cluster_node() {
    SLUICE_REDIS__CLUSTER_NODES=$REDIS_CLUSTER_NODES SLUICE_REDIS__SHARDS=${BENCH_REDIS_SHARDS:-12} \
      start_release_node "$@"
  }
  cluster_node ingest-1 "$DATABASE" --role ingest
  ingest_1=$NODE_PORT
  cluster_node ingest-2 "$DATABASE" --role ingest
  ingest_2=$NODE_PORT
  cluster_node writer-1 "$DATABASE" --role writer
  cluster_node writer-2 "$DATABASE" --role writer
  measure "redis cluster (3 masters + 3 replicas): 2 ingest + 2 writers" "$ingest_1" "$ingest_2"
  two=$RATE
  stop_release_nodes
  echo "=== end-to-end rates (every acknowledged event in PostgreSQL), same run"
  awk -v d="$direct" -v t="$two" 'BEGIN {
    printf "direct:              %8.0f events/s\n", d
    printf "cluster 2 + 2:       %8.0f events/s  (%.2f x direct)\n", t, t / d
  }'
  exit 0
fi
redis_node ingest-1 "$DATABASE" --role ingest
ingest_1=$NODE_PORT
redis_node writer-1 "$DATABASE" --role writer
measure "redis mode: 1 ingest + 1 writer" "$ingest_1"
one=$RATE
redis_node ingest-2 "$DATABASE" --role ingest
ingest_2=$NODE_PORT
redis_node writer-2 "$DATABASE" --role writer
measure "redis mode: 2 ingest + 2 writers" "$ingest_1" "$ingest_2"
two=$RATE
stop_release_nodes

echo "=== end-to-end rates (every acknowledged event in PostgreSQL), same run"
awk -v d="$direct" -v o="$one" -v t="$two" 'BEGIN {
  printf "direct:              %8.0f events/s\n", d
  printf "redis 1 + 1:         %8.0f events/s  (%.2f x direct)\n", o, o / d
  printf "redis 2 + 2:         %8.0f events/s  (%.2f x direct)\n", t, t / d
}'
