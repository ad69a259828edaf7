#!/usr/bin/env bash
# What idle Tail subscribers cost ingest (issue 25): the same load against one server with no
# Tail stream open, then with 500 streams that never read (one principal, ten connections),
# interleaved, on a throwaway PostgreSQL. Reports events/s and the server's peak RSS of each.
#
#   bench/tail.sh                        # 3 rounds of 200k events each way
#   BENCH_BINARY=/tmp/sluice-a bench/tail.sh --events 500000
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

rounds=${BENCH_ROUNDS:-3}
tails=${BENCH_TAILS:-500}
start_bench_environment
echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB, $(uname -sr), $(postgres --version)"
for round in $(seq 1 "$rounds"); do
  for open in 0 "$tails"; do
    # A fresh server per measurement: its peak RSS is this measurement's.
    SLUICE_READS__MAX_TAILS_PER_PRINCIPAL=$tails start_release_server "$PG_URL"
    echo "=== round $round, $open idle Tail streams"
    # shellcheck disable=SC2046
    "${BENCH_BINARY:-target/dist/sluice}" bench $(release_server_client_flags) \
      --database-url "$PG_URL" --server-pid "$SLUICE_PID" --reset-table \
      --idle-tails "$open" "$@"
    stop_release_server
  done
done
