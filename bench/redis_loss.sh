#!/usr/bin/env bash
# The loss window of `redis.wait_replicas = 0` in a Redis Cluster: what an ack promises when
# a master's machine is lost for good. One ingest and one writer node run through a 3 + 3
# cluster; `sluice send` streams EVENTS events with known ids (it resends until each is
# acknowledged). Mid-stream the master holding the most of sluice's shards is killed with
# SIGKILL and its data directory removed, so it never comes back; the cluster promotes its
# replica. Once everything has drained, acknowledged ids missing from PostgreSQL are counted.
#   BENCH_BINARY=<release build> bench/redis_loss.sh [ROUNDS]     EVENTS=500000 KILL_AFTER=2
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
rounds=${1:-3}
events=${EVENTS:-500000}
ensure_postgres_binaries
[ -n "${BENCH_BINARY:-}" ] || cargo build --profile dist --features jemalloc --quiet
binary=${BENCH_BINARY:-target/dist/sluice}
work=$(mktemp -d /tmp/sluice-redis-loss.XXXXXX)
cleanup() {
  [ -n "${SENDER:-}" ] && kill "$SENDER" 2>/dev/null || true
  stop_release_nodes
  stop_throwaway_redis
  stop_throwaway_postgres
  rm -rf "$work"
}
trap cleanup EXIT
# Failover within seconds, and a replica promoted whatever its data's age (Redis's default
# keeps a replica that lost its master 10 node timeouts ago from failing over at all): the
# promoted replica has exactly what replication gave it, which is the loss being measured.
export REDIS_CLUSTER_NODE_TIMEOUT=2000 REDIS_CLUSTER_VALIDITY_FACTOR=0
start_throwaway_postgres
psql() { command psql -X -q -At -v ON_ERROR_STOP=1 "$PG_URL" "$@"; }
echo "machine: $(nproc) cores, $(uname -sr), $(redis-server --version | cut -d' ' -f3)"
for round in $(seq 1 "$rounds"); do
  service="loss-$round"
  python3 - "$events" "$service" >"$work/events.ndjson" <<'PY'
import json, sys, uuid
count, service = int(sys.argv[1]), sys.argv[2]
for n in range(count):
    print(json.dumps({"id": str(uuid.uuid4()), "service": service, "message": f"event {n}"}))
PY
  start_throwaway_redis_cluster
  export SLUICE_REDIS__CLUSTER_NODES=$REDIS_CLUSTER_NODES SLUICE_REDIS__SHARDS=12 \
    SLUICE_REDIS__WAIT_REPLICAS=0 SLUICE_REDIS__CLAIM_IDLE=2s
  start_release_node "ingest-$round" "$PG_URL" --role ingest
  ingest_port=$NODE_PORT
  start_release_node "writer-$round" "$PG_URL" --role writer
  "$binary" send "$work/events.ndjson" --addr "https://localhost:$ingest_port" \
    --ca "$SLUICE_WORK/certs/ca.pem" --cert "$SLUICE_WORK/certs/client.pem" \
    --key "$SLUICE_WORK/certs/client.key" >"$work/send.log" 2>&1 &
  SENDER=$!
  # The load in full flow (the send takes several seconds at these sizes).
  sleep "${KILL_AFTER:-2}"
  kill -0 "$SENDER" 2>/dev/null || { echo "the send ended before the kill: raise EVENTS" >&2; exit 1; }
  # The master with the most of sluice's streams loses its machine.
  busiest=0 most=-1
  for index in "${!REDIS_CLUSTER_PORTS[@]}"; do
    port=${REDIS_CLUSTER_PORTS[$index]}
    redis-cli -p "$port" role | head -1 | grep -q master || continue
    streams=$(redis-cli -p "$port" --scan --pattern 'sluice:events:*' | grep -vc backlog || true)
    if [ "$streams" -gt "$most" ]; then busiest=$index most=$streams; fi
  done
  port=${REDIS_CLUSTER_PORTS[$busiest]}
  acked_before=$(psql -c "SELECT count(*) FROM events WHERE service = '$service'")
  # How far its replica was behind, in replication bytes, the moment before.
  lag=$(redis-cli -p "$port" info replication | tr -d '\r' | awk -F'[=,:]' '
    /^master_repl_offset/ { master = $2 } /^slave0/ { for (i = 1; i < NF; i++) if ($i == "offset") replica = $(i + 1) }
    END { print master - replica }')
  kill -9 "${REDIS_CLUSTER_PIDS[$busiest]}"
  rm -rf "${REDIS_TMP:?}/$port"
  killed_at=$(date +%s.%N)
  wait "$SENDER"
  SENDER=
  sent_at=$(date +%s.%N)
  # Drained: the count stops moving for 10 s.
  last=-1 still=0
  while [ "$still" -lt 50 ]; do
    now=$(psql -c "SELECT count(*) FROM events WHERE service = '$service'")
    if [ "$now" = "$last" ]; then still=$((still + 1)); else still=0 last=$now; fi
    sleep 0.2
  done
  stored=$(psql -c "SELECT count(DISTINCT id) FROM events WHERE service = '$service'")
  rows=$(psql -c "SELECT count(*) FROM events WHERE service = '$service'")
  printf 'round %d: master :%s (%d of 12 streams, replica %s bytes behind) lost %s s into the send (%d events stored by then); the send acknowledged all %d %.1f s later; stored %d once (%d rows): %d acknowledged events lost\n' \
    "$round" "$port" "$most" "$lag" "${KILL_AFTER:-2}" "$acked_before" "$events" "$(awk "BEGIN { print $sent_at - $killed_at }")" "$stored" "$rows" $((events - stored))
  stop_release_nodes
  stop_throwaway_redis
done
