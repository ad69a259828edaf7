#!/usr/bin/env bash
# Backups of the private cluster, for the RTO: ROWS bench-like events are loaded into a private
# cluster under a temp dir, then `sluice backup --once`, `sluice backup --verify` and, after the
# cluster's directory is deleted, `sluice restore --to latest` are timed against a file://
# repository. Prints the database size, the backup's stored bytes and each time.
#   bench/backup.sh [ROWS]
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
rows=${1:-1000000}
ensure_postgres_binaries
cargo build --profile dist --features jemalloc --quiet
work=$(mktemp -d /tmp/sluice-backup-bench.XXXXXX)
chmod 755 "$work" # PostgreSQL (the postgres user, under root) reaches its cluster and the repository
data="$work/data"
stop_cluster() { run_as_postgres "$PG_BIN/pg_ctl" -D "$data/postgres" -m immediate -w stop >/dev/null 2>&1 || true; }
trap 'stop_cluster; rm -rf "$work"' EXIT
export SLUICE_DATA_DIR="$data" SLUICE_BACKUP__URL="file://$work/repository" RUST_LOG=warn
sluice() { target/dist/sluice "$@"; }
seconds() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$1" "$2"; }

echo "machine: $(nproc) cores, $(uname -sr), $(postgres --version)"
sluice lifecycle --once >/dev/null # the cluster, the schema and the partitions
run_as_postgres "$PG_BIN/pg_ctl" -D "$data/postgres" -l "$data/postgres/postgres.log" -w \
  -o "-c listen_addresses='' -c unix_socket_directories='$data/run'" start >/dev/null
psql() { command psql -X -q -v ON_ERROR_STOP=1 -h "$data/run" -U sluice sluice "$@"; }
psql -c "INSERT INTO events (id, service, message, ts, user_id, metadata) \
  SELECT gen_random_uuid(), 'svc-' || (i % 8), 'GET /api/orders/' || i || ' 200 OK in ' || (i % 97) || ' ms', \
  now() - (i % 86400000) * interval '1 ms' * 20, 'user-' || (i % 10000), \
  jsonb_build_object('path', '/api/orders/' || i, 'status', 200, 'latencyMs', i % 97, 'region', 'eu-west-1') \
  FROM generate_series(1, $rows) i"
psql -c "CHECKPOINT"
size=$(psql -At -c "SELECT pg_size_pretty(pg_database_size('sluice'))")
stop_cluster

start=$(date +%s.%N)
taken=$(sluice backup --once)
backup_s=$(seconds "$start" "$(date +%s.%N)")
stored=$(python3 -c 'import json,sys; b=json.load(sys.stdin)["backup"]; print(sum(f["bytes"] for f in b["files"]))' <<<"$taken")
start=$(date +%s.%N)
verified=$(sluice backup --verify)
verify_s=$(seconds "$start" "$(date +%s.%N)")
rm -rf "$data/postgres"
start=$(date +%s.%N)
restored=$(sluice restore --to latest --data-dir "$data")
restore_s=$(seconds "$start" "$(date +%s.%N)")
stop_cluster
python3 - "$rows" "$size" "$stored" "$backup_s" "$verify_s" "$restore_s" "$verified" "$restored" <<'PY'
import json, sys
rows, size, stored, backup_s, verify_s, restore_s = sys.argv[1:7]
verified, restored = json.loads(sys.argv[7]), json.loads(sys.argv[8])
assert verified["events"] == int(rows), verified
assert restored["events"] == int(rows), restored
print(f"rows: {int(rows):,}; database: {size}; backup stored: {int(stored) / 2**20:.1f} MiB (zstd)")
print(f"backup --once: {backup_s} s; backup --verify: {verify_s} s (restore + count); restore --to latest: {restore_s} s")
PY
