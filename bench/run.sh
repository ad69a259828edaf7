#!/usr/bin/env bash
# End-to-end benchmark on this machine: a throwaway PostgreSQL with default (durable) settings,
# a release build of sluice over mTLS, then `sluice bench`, which measures the raw binary COPY
# ceiling of the same database and sluice's ingest rate, and prints their ratio.
#
#   bench/run.sh                          # defaults: 200k events, 8 streams, 500 events/request
#   bench/run.sh --events 500000 --streams 16
#
# Server settings can be varied through SLUICE_* variables, e.g.
#   SLUICE_WRITER__BATCH_MAX_EVENTS=1000 bench/run.sh
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

ensure_postgres_binaries
cargo build --release --quiet
work=$(mktemp -d /tmp/sluice-bench.XXXXXX)
server_pid=""
cleanup() {
  [ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null && wait "$server_pid" 2>/dev/null
  stop_throwaway_postgres
  rm -rf "$work"
}
trap cleanup EXIT
start_throwaway_postgres
[ "${BENCH_UNIX_SOCKET:-0}" = 1 ] && BENCH_SERVER_DATABASE_URL=$PG_SOCKET_URL
port=$(free_port)
SLUICE_TLS__CERT_DIR="$work/certs" SLUICE_DATA_DIR="$work/data" \
  target/release/sluice --listen "127.0.0.1:$port" --database-url "${BENCH_SERVER_DATABASE_URL:-$PG_URL}" --metrics-listen 127.0.0.1:0 \
  >"$work/server.log" 2>&1 &
server_pid=$!
for _ in $(seq 1 100); do
  grep -q "sluice listening" "$work/server.log" 2>/dev/null && break
  sleep 0.1
done
grep -q "sluice listening" "$work/server.log" || { cat "$work/server.log"; exit 1; }

echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB, $(uname -sr), $(postgres --version)"
target/release/sluice bench --addr "https://localhost:$port" \
  --ca "$work/certs/ca.pem" --cert "$work/certs/client.pem" --key "$work/certs/client.key" \
  --database-url "$PG_URL" --server-pid "$server_pid" --reset-table "$@"
