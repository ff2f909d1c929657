#!/usr/bin/env bash
# Where `s3blk serve` holds its memory, phase by phase: the jobs of
# bench/s3.sh on a moto server this script starts (optionally behind
# bench/s3proxy.py), one s3blk binary or several in the same run. Samples
# VmRSS and the volume's gauges (dirty, cached and write-log bytes, staged
# chunks) every 0.2 s and prints, per binary, each phase's peak RSS and the
# gauges at that peak; the cold random-read job's IOPS besides.
#
#   bench/phases.sh [BINARY ...]        default: a release build of this tree
#   S3BLK_BENCH_LATENCY_MS=0            > 0: through the proxy with that delay
#   S3BLK_BENCH_SECONDS=8               the timed jobs
#   S3BLK_BENCH_CHUNK=1MiB              the volume's chunk size
set -euo pipefail
cd "$(dirname "$0")/.."
latency=${S3BLK_BENCH_LATENCY_MS:-0}
seconds=${S3BLK_BENCH_SECONDS:-8}
chunk=${S3BLK_BENCH_CHUNK:-1MiB}
venv=${VIRTUAL_ENV:-.venv}
py=$venv/bin/python
need() { echo "bench/phases.sh needs $1" >&2; exit 1; }
for t in fio curl; do command -v "$t" >/dev/null || need "$t"; done
/usr/bin/python3 -c 'import nbd' 2>/dev/null || need "python3-libnbd"
[ -x "$venv/bin/moto_server" ] || need "moto's server in $venv"
bins=("$@")
if [ ${#bins[@]} -eq 0 ]; then
  cargo build --release --quiet
  bins=(./target/release/s3blk)
fi
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT
export AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=bench AWS_REGION=us-east-1 AWS_DEFAULT_REGION=us-east-1 \
  AWS_EC2_METADATA_DISABLED=true
free_port() { "$py" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
port=$(free_port)
"$venv/bin/moto_server" -H 127.0.0.1 -p "$port" >"$work/moto.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do curl -s -o /dev/null "http://127.0.0.1:$port/" && break; sleep 0.2; done
url=http://127.0.0.1:$port
"$py" -c 'import boto3, sys; boto3.client("s3", endpoint_url=sys.argv[1]).create_bucket(Bucket="bench")' "$url"
if [ "$latency" -gt 0 ]; then
  "$py" bench/s3proxy.py "$port" "$latency" "" >"$work/proxy.out" 2>"$work/proxy.err" &
  pids+=($!)
  for _ in $(seq 100); do grep -q '^listening' "$work/proxy.out" && break; sleep 0.1; done
  url=http://127.0.0.1:$(sed -n 's/^listening //p' "$work/proxy.out")
fi
mport=$(free_port)
echo "moto on 127.0.0.1:$port (+${latency} ms per request); chunk $chunk; ${seconds}s per timed job; $(nproc) CPUs; $(date -u '+%Y-%m-%d %H:%M UTC')"

sp="" uri=""
start() { # binary volume
  rm -f "$work/s.sock"
  AWS_ENDPOINT_URL=$url "$1" serve "s3://bench/$2/vol" --create --size 1024MiB --chunk-size "$chunk" \
    --write-log-dir "$work/wl" --listen "unix:$work/s.sock" --metrics-address "127.0.0.1:$mport" \
    >"$work/serve.out" 2>"$work/serve.err" &
  sp=$!
  pids+=("$sp")
  for _ in $(seq 600); do grep -q '^serving' "$work/serve.out" 2>/dev/null && break; sleep 0.1; done
  grep -q '^serving' "$work/serve.out" || { cat "$work/serve.err" >&2; exit 1; }
  uri="nbd+unix:///vol?socket=$work/s.sock"
  ( while [ -e "/proc/$sp/status" ]; do
      rss=$(sed -n 's/^VmRSS:[[:space:]]*\([0-9]*\) kB/\1/p' "/proc/$sp/status" 2>/dev/null)
      gauges=$(curl -s "127.0.0.1:$mport/metrics" | awk '/^s3blk_volume_(dirty_bytes|cache_bytes|staged_chunks|write_log_bytes)\{/ {
        split($1, a, "{"); n = substr(a[1], 14); v = $2; if (n != "staged_chunks") v = v / 1048576; printf " %s=%.0f", n, v }')
      echo "$(cat "$work/phase" 2>/dev/null) ${rss:-0}$gauges"
      sleep 0.2
    done ) >>"$work/samples" &
}
phase() { echo "$1" >"$work/phase"; }
stop() { phase shutdown; kill -TERM "$sp"; wait "$sp" || true; sleep 0.3; }
drive() { /usr/bin/python3 bench/s3drive.py "$uri" "$@" >/dev/null; }
fio_job() { # rw size-MiB extra...
  fio --name=job --ioengine=nbd --uri="$uri" --rw="$1" --bs=4k --iodepth=32 --size="${2}m" "${@:3}" \
    --output-format=json --output="$work/fio.json" >/dev/null
}
n=0
for bin in "${bins[@]}"; do
  n=$((n + 1))
  : >"$work/samples"
  start "$bin" "v$n"
  phase seqwrite; drive seqwrite 64 8
  phase seqread-hot; drive seqread 32 8
  phase fsync; drive fsync 32 "$seconds"
  phase randread-hot; fio_job randread 32 --time_based --runtime="$seconds"
  stop
  start "$bin" "v$n"
  phase seqread-cold; drive seqread 64 8
  stop
  start "$bin" "v$n"
  phase randread-cold; fio_job randread 64 --number_ios=500
  iops=$("$py" -c 'import json, sys; print(round(json.load(open(sys.argv[1]))["jobs"][0]["read"]["iops"]))' "$work/fio.json")
  phase randwrite-cold; fio_job randwrite 1024 --time_based --runtime="$seconds"
  stop
  echo "$bin: cold 4 KiB random reads (500, QD32) $iops IOPS; peak RSS by phase (MiB), with the gauges then:"
  awk '$1 != "" { if ($2 > peak[$1]) { peak[$1] = $2; at[$1] = $0 } if (!($1 in order)) { order[$1] = ++k; name[k] = $1 } }
    END { for (i = 1; i <= k; i++) { p = name[i]; rest = at[p]; sub(/^[^ ]+ [^ ]+/, "", rest); printf "  %-15s %6.0f %s\n", p, peak[p] / 1024, rest } }' \
    "$work/samples"
done
