#!/usr/bin/env bash
# What traces cost: bench/run.sh with export off, then exporting to a real OTLP/gRPC receiver
# (bench/otlp_sink.py) at 1% and 100% sampling, then 100% without storing trace ids. Each line
# of the summary is one run's `sluice bench` ratio against the COPY ceiling of that run.
#
#   bench/tracing.sh                      # run.sh's defaults
#   bench/tracing.sh --events 500000      # flags go to every run
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

VENV=target/test-tools/venv
if ! "$VENV/bin/python" -c 'import grpc' 2>/dev/null; then
  python3 -m venv "$VENV" && "$VENV/bin/python" -m pip install --quiet grpcio
fi
SINK_PORT=$(free_port)
"$VENV/bin/python" bench/otlp_sink.py "$SINK_PORT" &
SINK_PID=$!
trap 'kill $SINK_PID 2>/dev/null || true' EXIT

run() {
  echo "=== $1"
  shift
  env "$@" bench/run.sh "${BENCH_ARGS[@]}"
}
BENCH_ARGS=("$@")
ENDPOINT="SLUICE_TELEMETRY__OTLP_ENDPOINT=http://127.0.0.1:$SINK_PORT"
run "tracing off" SLUICE_TELEMETRY__STORE_TRACE_ID=true
run "tracing on, 1% sampled" "$ENDPOINT" SLUICE_TELEMETRY__SAMPLE_RATIO=0.01
run "tracing on, 100% sampled (every event stores its trace id)" "$ENDPOINT" SLUICE_TELEMETRY__SAMPLE_RATIO=1.0
run "tracing on, 100% sampled, trace ids not stored" "$ENDPOINT" SLUICE_TELEMETRY__SAMPLE_RATIO=1.0 SLUICE_TELEMETRY__STORE_TRACE_ID=false
