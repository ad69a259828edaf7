#!/usr/bin/env bash
# Server memory under wide-Struct requests (issue 15): a throwaway PostgreSQL, a dist build (fat LTO)
# of sluice over mTLS, then bench/memory_attack.py (grpcio) against it.
#
#   bench/memory.sh              # 350,000-key metadata, 30 s settle
#   bench/memory.sh --keys 100000 --settle 10
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

venv="target/test-tools/venv"
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import grpc' 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check grpcio protobuf
fi
start_bench_environment
start_release_server "$PG_URL"
echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB, $(uname -sr)"
"$venv/bin/python" bench/memory_attack.py --addr "localhost:$SLUICE_PORT" \
  --certs "$SLUICE_WORK/certs" --pid "$SLUICE_PID" "$@"
