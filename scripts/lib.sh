# Shared shell helpers for scripts/test and bench/run.sh. Source it; do not run it.

log() { printf '==> %s\n' "$*" >&2; }
as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

apt_updated=0
apt_install() {
  if [ "$apt_updated" -eq 0 ]; then as_root apt-get update -qq >/dev/null; apt_updated=1; fi
  log "installing $*"
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

pg_bin_dir() {
  if command -v initdb >/dev/null 2>&1 && command -v pg_ctl >/dev/null 2>&1; then
    dirname "$(readlink -f "$(command -v initdb)")"; return
  fi
  ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1
}

# Puts PostgreSQL's server binaries on PATH, installing them from Debian when missing. Sets PG_BIN.
ensure_postgres_binaries() {
  PG_BIN=$(pg_bin_dir || true)
  if [ -z "$PG_BIN" ] || [ ! -x "$PG_BIN/initdb" ]; then
    apt_install postgresql
    PG_BIN=$(pg_bin_dir)
  fi
  export PATH="$PG_BIN:$PATH"
}

run_as_postgres() { if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# Starts a throwaway cluster in a temp dir on a free loopback port. Extra `-c name=value`
# settings may be passed as arguments. Sets PG_TMP and PG_URL; call stop_throwaway_postgres.
start_throwaway_postgres() {
  PG_TMP=$(mktemp -d /tmp/sluice-pg.XXXXXX)
  if [ "$(id -u)" -eq 0 ]; then
    id postgres >/dev/null 2>&1 || useradd --system --home-dir /var/lib/postgresql postgres
    chown postgres "$PG_TMP"
  fi
  local port
  port=$(free_port)
  log "starting throwaway PostgreSQL on 127.0.0.1:$port ($PG_TMP)"
  run_as_postgres "$PG_BIN/initdb" -D "$PG_TMP/data" -U sluice --auth=trust --encoding=UTF8 --locale=C.UTF-8 >/dev/null
  run_as_postgres "$PG_BIN/pg_ctl" -D "$PG_TMP/data" -l "$PG_TMP/postgres.log" -w -t 60 start -o \
    "-p $port -c listen_addresses=127.0.0.1 -c unix_socket_directories=$PG_TMP -c max_connections=400 $*" >/dev/null
  PG_URL="postgres://sluice@127.0.0.1:$port/postgres"
  PG_SOCKET_URL="postgres://sluice@localhost/postgres?host=$PG_TMP&port=$port"
}

stop_throwaway_postgres() {
  [ -n "${PG_TMP:-}" ] || return 0
  run_as_postgres "$PG_BIN/pg_ctl" -D "$PG_TMP/data" -m immediate -w stop >/dev/null 2>&1 || true
  rm -rf "$PG_TMP"
}

# Starts moto's S3-compatible server from venv $1 on a free loopback port, in a temp dir, and
# creates bucket $2. Sets S3_ENDPOINT; call stop_throwaway_s3.
start_throwaway_s3() {
  local port
  port=$(free_port)
  S3_TMP=$(mktemp -d /tmp/sluice-s3.XXXXXX)
  S3_ENDPOINT="http://127.0.0.1:$port"
  log "starting throwaway S3 (moto) on 127.0.0.1:$port"
  (cd "$S3_TMP" && exec "$1/bin/moto_server" -H 127.0.0.1 -p "$port" >"$S3_TMP/moto.log" 2>&1) &
  S3_PID=$!
  for _ in $(seq 1 100); do
    if "$1/bin/python" -c "import urllib.request as r; r.urlopen(r.Request('$S3_ENDPOINT/$2', method='PUT'), timeout=1)" 2>/dev/null; then
      return 0
    fi
    sleep 0.2
  done
  cat "$S3_TMP/moto.log" >&2
  return 1
}

stop_throwaway_s3() {
  [ -n "${S3_PID:-}" ] && kill "$S3_PID" 2>/dev/null && wait "$S3_PID" 2>/dev/null
  [ -n "${S3_TMP:-}" ] && rm -rf "$S3_TMP"
  return 0
}

# Starts a dist build (fat LTO) of sluice on a free port against database URL $1, with dev certificates
# in a temp dir, and with `--config $BENCH_CONFIG` when that is set. Sets SLUICE_PID, SLUICE_PORT and SLUICE_WORK (certs in $SLUICE_WORK/certs);
# stop_release_server stops it and removes the dir.
start_release_server() {
  SLUICE_WORK=$(mktemp -d /tmp/sluice-bench.XXXXXX)
  SLUICE_PORT=$(free_port)
  local config=()
  [ -n "${BENCH_CONFIG:-}" ] && config=(--config "$(readlink -f "$BENCH_CONFIG")")
  SLUICE_TLS__CERT_DIR="$SLUICE_WORK/certs" SLUICE_DATA_DIR="$SLUICE_WORK/data" \
    "${BENCH_BINARY:-target/dist/sluice}" "${config[@]}" --listen "127.0.0.1:$SLUICE_PORT" --database-url "$1" --metrics-listen 127.0.0.1:0 \
    >"$SLUICE_WORK/server.log" 2>&1 &
  SLUICE_PID=$!
  wait_for_listening "$SLUICE_WORK/server.log"
}

# Waits until the sluice logging to $1 listens (10 s at most); shows its log if it does not.
wait_for_listening() {
  for _ in $(seq 1 100); do
    grep -q "sluice listening" "$1" 2>/dev/null && return 0
    sleep 0.1
  done
  cat "$1" >&2
  return 1
}

stop_release_server() {
  if [ -n "${SLUICE_PID:-}" ]; then { kill "$SLUICE_PID" && wait "$SLUICE_PID"; } 2>/dev/null || true; fi
  SLUICE_PID=
  stop_release_nodes
  [ -n "${SLUICE_WORK:-}" ] && rm -rf "$SLUICE_WORK"
  return 0
}

# start_release_node NAME DATABASE_URL [sluice flags...]: one more release sluice on a free port
# (NODE_PORT), with its data in $SLUICE_WORK/NAME and the certificates of $SLUICE_WORK/certs
# shared by every node, so one client configuration reaches them all. Start nodes one after
# the other: the first creates the certificates.
NODE_PIDS=()
start_release_node() {
  local name=$1 url=$2
  shift 2
  [ -n "${SLUICE_WORK:-}" ] || SLUICE_WORK=$(mktemp -d /tmp/sluice-bench.XXXXXX)
  mkdir -p "$SLUICE_WORK/$name"
  NODE_PORT=$(free_port)
  SLUICE_TLS__CERT_DIR="$SLUICE_WORK/certs" SLUICE_DATA_DIR="$SLUICE_WORK/$name/data" \
    "${BENCH_BINARY:-target/dist/sluice}" --listen "127.0.0.1:$NODE_PORT" --database-url "$url" --metrics-listen 127.0.0.1:0 "$@" \
    >"$SLUICE_WORK/$name/server.log" 2>&1 &
  NODE_PIDS+=("$!")
  wait_for_listening "$SLUICE_WORK/$name/server.log"
}

stop_release_nodes() {
  local pid
  for pid in "${NODE_PIDS[@]}"; do { kill "$pid" && wait "$pid"; } 2>/dev/null || true; done
  NODE_PIDS=()
}

# Starts redis-server (Debian's) with AOF on and fsync on every write, on a free loopback port
# in a temp dir. Sets REDIS_URL; stop_throwaway_redis stops it.
start_throwaway_redis() {
  command -v redis-server >/dev/null 2>&1 || apt_install redis-server
  local port
  port=$(free_port)
  REDIS_TMP=$(mktemp -d /tmp/sluice-redis.XXXXXX)
  redis-server --bind 127.0.0.1 --port "$port" --dir "$REDIS_TMP" --appendonly yes \
    --appendfsync always --save "" >"$REDIS_TMP/redis.log" 2>&1 &
  REDIS_PID=$!
  REDIS_URL="redis://127.0.0.1:$port"
  for _ in $(seq 1 100); do
    redis-cli -p "$port" ping >/dev/null 2>&1 && { log "started throwaway Redis on 127.0.0.1:$port ($REDIS_TMP)"; return 0; }
    sleep 0.1
  done
  cat "$REDIS_TMP/redis.log" >&2
  return 1
}

stop_throwaway_redis() {
  if [ -n "${REDIS_PID:-}" ]; then { kill "$REDIS_PID" && wait "$REDIS_PID"; } 2>/dev/null || true; fi
  local pid
  for pid in "${REDIS_CLUSTER_PIDS[@]}"; do { kill "$pid" && wait "$pid"; } 2>/dev/null || true; done
  REDIS_CLUSTER_PIDS=()
  REDIS_CLUSTER_PORTS=()
  [ -n "${REDIS_TMP:-}" ] && rm -rf "$REDIS_TMP"
  return 0
}

# Starts a Redis Cluster of 3 masters and 3 replicas (AOF on, fsync on every write), each node
# on a free loopback port below 55535 (its bus port is +10000) in a temp dir. Sets
# REDIS_CLUSTER_NODES (comma-separated URLs); stop_throwaway_redis stops it.
REDIS_CLUSTER_PIDS=()
REDIS_CLUSTER_PORTS=()
start_throwaway_redis_cluster() {
  command -v redis-server >/dev/null 2>&1 || apt_install redis-server
  REDIS_TMP=$(mktemp -d /tmp/sluice-redis.XXXXXX)
  local port addresses=() urls=()
  while [ "${#addresses[@]}" -lt 6 ]; do
    port=$(free_port)
    [ "$port" -lt 55535 ] || continue
    mkdir -p "$REDIS_TMP/$port"
    redis-server --bind 127.0.0.1 --port "$port" --dir "$REDIS_TMP/$port" --cluster-enabled yes \
      --cluster-node-timeout "${REDIS_CLUSTER_NODE_TIMEOUT:-15000}" \
      --cluster-replica-validity-factor "${REDIS_CLUSTER_VALIDITY_FACTOR:-10}" \
      --appendonly yes --appendfsync always --save "" >"$REDIS_TMP/$port/redis.log" 2>&1 &
    REDIS_CLUSTER_PIDS+=($!)
    REDIS_CLUSTER_PORTS+=("$port")
    addresses+=("127.0.0.1:$port")
    urls+=("redis://127.0.0.1:$port")
  done
  for address in "${addresses[@]}"; do
    for _ in $(seq 1 100); do
      redis-cli -p "${address#*:}" ping >/dev/null 2>&1 && break
      sleep 0.1
    done
  done
  redis-cli --cluster create "${addresses[@]}" --cluster-replicas 1 --cluster-yes >/dev/null
  for _ in $(seq 1 300); do
    redis-cli -p "${addresses[0]#*:}" cluster info | grep -q cluster_state:ok && break
    sleep 0.1
  done
  REDIS_CLUSTER_NODES=$(IFS=,; echo "${urls[*]}")
  log "started throwaway Redis Cluster (3 masters, 3 replicas) on ${addresses[*]}"
}

# The client flags for the server started by start_release_server.
release_server_client_flags() {
  echo --addr "https://localhost:$SLUICE_PORT" --ca "$SLUICE_WORK/certs/ca.pem" \
    --cert "$SLUICE_WORK/certs/client.pem" --key "$SLUICE_WORK/certs/client.key"
}

# For benchmarks: PostgreSQL binaries, a dist build (fat LTO), a throwaway cluster (durable settings),
# and an EXIT trap that stops the server and the cluster.
bench_cleanup() {
  stop_release_server
  stop_throwaway_redis
  stop_throwaway_postgres
}
# BENCH_BINARY runs a prebuilt binary instead of building this checkout (A/B runs of two builds):
#   BENCH_BINARY=/tmp/sluice-before bench/run.sh
start_bench_environment() {
  ensure_postgres_binaries
  if [ -z "${BENCH_BINARY:-}" ]; then
    cargo build --profile dist --features jemalloc --quiet
  fi
  trap bench_cleanup EXIT
  start_throwaway_postgres
}

# Loads $1 synthetic events into $PG_URL for the read-side benchmarks (bench/query.sh,
# bench/search.sh): the last 28 days, 8 services, 50,000 users, in time order as ingest writes
# them (each block holds a narrow span of time, as in production); then the hourly rollup.
load_query_rows() {
  local rows=$1 chunk=1000000 from to started
  log "loading $rows rows"
  started=$(date +%s)
  for ((from = 0; from < rows; from += chunk)); do
    to=$((from + chunk < rows ? from + chunk : rows))
    psql -X -q -v ON_ERROR_STOP=1 "$PG_URL" -c "
      INSERT INTO events (id, service, message, ts, user_id, metadata)
      SELECT gen_random_uuid(), 'svc-' || (g % 8),
             'GET /api/orders/' || g || ' -> 200 in ' || (g % 900) || ' ms',
             now() - interval '28 days' * ($rows - g)::float8 / $rows,
             'user-' || (g % 50000),
             jsonb_build_object('path', '/api/orders', 'status', 200, 'region', (ARRAY['eu','us','ap'])[1 + g % 3])
      FROM generate_series($from + 1, $to) AS g"
  done
  psql -X -q -v ON_ERROR_STOP=1 "$PG_URL" -c "TRUNCATE event_counts" \
    -c "INSERT INTO event_counts SELECT service, date_trunc('hour', ts, 'UTC'), 0, count(*) FROM events GROUP BY 1, 2" \
    -c "VACUUM ANALYZE events" -c "VACUUM ANALYZE event_counts"
  log "loaded in $(( $(date +%s) - started )) s"
}
