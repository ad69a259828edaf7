#!/usr/bin/env bash
# Overload as stock clients meet it (issue 27), on a throwaway PostgreSQL with a small buffer
# (2,000 events; admit_wait 200 ms, the default, or BENCH_ADMIT_WAIT): herds of concurrent Publish calls of 200 events from stock
# grpc-js and grpcio stubs with a plain service-config retry policy (5 attempts,
# RESOURCE_EXHAUSTED retryable), at 1x, 4x and 16x of 60 calls; then one principal flooding
# from 16 streams while another sends 100 events every 100 ms. Reports calls that got
# through, refused attempts per call, time to the last success, and each principal's refusals.
#
#   bench/overload.sh
#   BENCH_BINARY=/tmp/sluice-a bench/overload.sh
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

python=${BENCH_PYTHON:-target/test-tools/venv/bin/python}
[ -x "$python" ] || { echo "needs the test venv ($python): run scripts/test once" >&2; exit 1; }
command -v node >/dev/null || { echo "needs node (scripts/test installs it)" >&2; exit 1; }
binary=${BENCH_BINARY:-target/dist/sluice}
start_bench_environment
echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB, $(uname -sr), $(postgres --version)"
SLUICE_BUFFER__MAX_EVENTS=2000 SLUICE_BUFFER__ADMIT_WAIT=${BENCH_ADMIT_WAIT:-200ms} start_release_server "$PG_URL"
metrics=$(grep -o 'metrics endpoint listening.*' "$SLUICE_WORK/server.log" | grep -o '127\.0\.0\.1:[0-9]*' | head -1)
refused_attempts() {
  # Refused requests: events refused for room, 200 per request.
  curl -s "http://$metrics/metrics" | awk '/^sluice_events_refused_total\{reason="(buffer_full|over_share)"\}/ {sum += $2} END {printf "%d", sum / 200}'
}
for client in node python; do
  for calls in 60 240 960; do
    before=$(refused_attempts)
    if [ "$client" = node ]; then
      report=$(SLUICE_ADDR="localhost:$SLUICE_PORT" SLUICE_CERTS="$SLUICE_WORK/certs" CALLS=$calls EVENTS=200 node bench/overload/herd.js)
    else
      report=$(SLUICE_ADDR="localhost:$SLUICE_PORT" SLUICE_CERTS="$SLUICE_WORK/certs" CALLS=$calls EVENTS=200 "$python" bench/overload/herd.py)
    fi
    after=$(refused_attempts)
    echo "$report" | "$python" -c "
import json, sys
r = json.load(sys.stdin)
print(f\"{r['client']:8} {r['calls']:4} calls ({r['calls'] // 60}x): {r['ok']} through, {($after - $before) / r['calls']:.2f} refused attempts per call, last success after {r['seconds_to_last_ok']:.2f} s; failures {r['failures']}\")"
  done
done
"$binary" certs --name noisy --cert-dir "$SLUICE_WORK/certs" --out-dir "$SLUICE_WORK/certs" >/dev/null
"$binary" certs --name quiet --cert-dir "$SLUICE_WORK/certs" --out-dir "$SLUICE_WORK/certs" >/dev/null
SLUICE_ADDR="localhost:$SLUICE_PORT" SLUICE_CERTS="$SLUICE_WORK/certs" "$python" bench/overload/fair.py
