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

start_bench_environment
[ "${BENCH_UNIX_SOCKET:-0}" = 1 ] && BENCH_SERVER_DATABASE_URL=$PG_SOCKET_URL
start_release_server "${BENCH_SERVER_DATABASE_URL:-$PG_URL}"

echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB, $(uname -sr), $(postgres --version)"
# shellcheck disable=SC2046
target/release/sluice bench $(release_server_client_flags) \
  --database-url "$PG_URL" --server-pid "$SLUICE_PID" --reset-table "$@"
