#!/usr/bin/env bash
# s3blk against its S3 peers, on S3: a moto server this script starts, used
# directly and behind bench/s3proxy.py (which holds every request
# S3BLK_BENCH_LATENCY_MS before forwarding it, and counts requests). On each
# endpoint, in the same run:
#   ceiling      the endpoint itself, with boto3 (bench/s3ceiling.py)
#   s3blk 1M     `s3blk serve`, a volume of 1 MiB chunks (the default)
#   s3blk 64K    `s3blk serve`, a volume of 64 KiB chunks
#   nbdkit S3    nbdkit's S3 plugin, 64 KiB objects
# and, on a compressible data set (an ext4 image of S3BLK_BENCH_SEQ_MIB
# holding text: /usr/share/doc, made with mkfs.ext4 -d), s3blk 1M chunks
# with compression none and zstd and the nbdkit S3 plugin: sequential
# write + FLUSH, cold sequential read, and the bytes stored in the bucket.
# Both s3blk servers keep their write-back log in a temporary directory. The
# NBD servers listen on unix sockets; fio's nbd engine and bench/s3drive.py
# (libnbd) drive them. Prints one table per scenario.
#
#   bench/s3.sh
#   S3BLK_BENCH_LATENCY_MS=20   the proxy's delay per request
#   S3BLK_BENCH_SECONDS=8       each timed job (fsync loop, random I/O, ceiling)
#   S3BLK_BENCH_SEQ_MIB=64      sequential write and read; cold random reads land here
#   S3BLK_BENCH_HOT_MIB=32      fsync loop and hot random reads land here
#   S3BLK_BENCH_VOLUME_MIB=1024 volume size; cold random writes land anywhere in it
#   S3BLK_BENCH_COLD_READS=500  4 KiB reads of the cold random read job
#   S3BLK_BENCH_PROXY_LOG=FILE  the proxy appends one line per request to FILE
#   S3BLK=target/debug/s3blk    skip the release build
#
# Each system's run, per endpoint:
#   1. fresh server, new volume: sequential 1 MiB writes (8 in flight) + FLUSH;
#      the hot region read once; 4 KiB write + FLUSH pairs at queue depth 1;
#      4 KiB random reads at QD32 over the hot region
#   2. fresh server: cold sequential 1 MiB reads (8 in flight)
#   3. fresh server: cold 4 KiB random reads at QD32, then 4 KiB random
#      writes at QD32 over the whole volume (more than the default 256 MiB
#      dirty limit); the timed window ends before the server writes back
#      what is still dirty (at its shutdown)
# Peak RSS is the largest VmHWM of the three server processes.
set -euo pipefail
cd "$(dirname "$0")/.."
latency=${S3BLK_BENCH_LATENCY_MS:-20}
seconds=${S3BLK_BENCH_SECONDS:-8}
seq_mib=${S3BLK_BENCH_SEQ_MIB:-64}
hot_mib=${S3BLK_BENCH_HOT_MIB:-32}
vol_mib=${S3BLK_BENCH_VOLUME_MIB:-1024}
cold_reads=${S3BLK_BENCH_COLD_READS:-500}

need() { echo "bench/s3.sh needs $1" >&2; exit 1; }
for t in fio nbdkit curl mkfs.ext4; do command -v "$t" >/dev/null || need "$t (./tests/run.sh installs fio and nbdkit)"; done
/usr/bin/python3 -c 'import nbd' 2>/dev/null || need "python3-libnbd (./tests/run.sh installs it)"
nbdkit S3 --dump-plugin >/dev/null 2>&1 || need "nbdkit's S3 plugin: apt-get install nbdkit-plugin-python python3-boto3"
nbdkit --filter=blocksize-policy null --dump-plugin >/dev/null 2>&1 || need "nbdkit's blocksize-policy filter (nbdkit >= 1.30)"
venv=${VIRTUAL_ENV:-.venv}
[ -x "$venv/bin/moto_server" ] || need "moto's server in $venv (python -m venv .venv && .venv/bin/pip install 'moto[server]' boto3)"
"$venv/bin/python" -c 'import boto3' 2>/dev/null || need "boto3 in $venv"
py=$venv/bin/python
bin=${S3BLK:-}
if [ -z "$bin" ]; then
  cargo build --release --quiet
  bin=./target/release/s3blk
fi

work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT
export AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=bench AWS_REGION=us-east-1 AWS_DEFAULT_REGION=us-east-1 \
  AWS_EC2_METADATA_DISABLED=true
results=$work/results.jsonl
: >"$results"

# --- the endpoints
moto_port=$("$py" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$venv/bin/moto_server" -H 127.0.0.1 -p "$moto_port" >"$work/moto.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do curl -s -o /dev/null "http://127.0.0.1:$moto_port/" && break; sleep 0.2; done
curl -s -o /dev/null "http://127.0.0.1:$moto_port/" || { echo "moto did not start:" >&2; cat "$work/moto.log" >&2; exit 1; }
"$py" bench/s3proxy.py "$moto_port" "$latency" "${S3BLK_BENCH_PROXY_LOG:-}" >"$work/proxy.out" 2>"$work/proxy.err" &
pids+=($!)
for _ in $(seq 100); do grep -q '^listening' "$work/proxy.out" && break; sleep 0.1; done
proxy_port=$(sed -n 's/^listening //p' "$work/proxy.out")
[ -n "$proxy_port" ] || { echo "bench/s3proxy.py did not start:" >&2; cat "$work/proxy.err" >&2; exit 1; }
"$py" -c 'import boto3, sys; boto3.client("s3", endpoint_url=sys.argv[1]).create_bucket(Bucket="bench")' \
  "http://127.0.0.1:$moto_port"
echo "moto $("$py" -c 'import moto; print(moto.__version__)') on 127.0.0.1:$moto_port, and behind bench/s3proxy.py (+${latency} ms per request); $(nproc) CPUs; $(date -u '+%Y-%m-%d %H:%M UTC')"
echo "volume ${vol_mib} MiB, sequential ${seq_mib} MiB, hot region ${hot_mib} MiB, ${seconds}s per timed job, ${cold_reads} cold random reads"

# --- bookkeeping: one JSON line per measurement, with the proxy's counters around it
endpoint="" url="" system=""
counters() { if [ "$endpoint" = proxy ]; then curl -s "http://127.0.0.1:$proxy_port/__bench/stats"; else echo null; fi; }
record() { # scenario ops result-json before-json
  printf '{"endpoint":"%s","system":"%s","scenario":"%s","ops":%s,"result":%s,"before":%s,"after":%s}\n' \
    "$endpoint" "$system" "$1" "$2" "$3" "$4" "$(counters)" >>"$results"
}
fail() { echo "bench/s3.sh: $*" >&2; exit 1; }

# --- servers
server="" uri="" rss_max=0
start_s3blk() { # chunk-size [compression]
  local sock=$work/$endpoint-$system.sock
  rm -f "$sock"
  AWS_ENDPOINT_URL=$url "$bin" serve "s3://bench/$endpoint/$system/vol" --create --size "${vol_mib}MiB" \
    --chunk-size "$1" --compression "${2:-none}" --write-log-dir "$work/write-log" --listen "unix:$sock" \
    >"$work/serve.out" 2>"$work/serve.err" &
  server=$!
  pids+=("$server")
  for _ in $(seq 600); do grep -q '^serving' "$work/serve.out" 2>/dev/null && break; sleep 0.1; done
  grep -q '^serving' "$work/serve.out" || { cat "$work/serve.err" >&2; fail "s3blk serve did not start"; }
  uri="nbd+unix:///vol?socket=$sock"
}
start_nbdkit() {
  local sock=$work/$endpoint-$system.sock
  rm -f "$sock"
  # The plugin advertises its object size as the minimum and maximum block
  # size; the policy filter lets 4 KiB and 1 MiB requests through to it (it
  # read-modify-writes and splits them itself).
  nbdkit -f -U "$sock" --filter=blocksize-policy S3 endpoint-url="$url" bucket=bench key="$endpoint/$system" \
    object-size=64K size="${vol_mib}M" blocksize-minimum=4096 blocksize-maximum=32M \
    >"$work/nbdkit.out" 2>"$work/nbdkit.err" &
  server=$!
  pids+=("$server")
  for _ in $(seq 300); do [ -S "$sock" ] && break; sleep 0.1; done
  [ -S "$sock" ] || { cat "$work/nbdkit.err" >&2; fail "nbdkit S3 did not start"; }
  uri="nbd+unix:///?socket=$sock"
}
start() {
  case $system in
    s3blk-1M | text-none) start_s3blk 1MiB ;;
    s3blk-64K) start_s3blk 64KiB ;;
    text-zstd) start_s3blk 1MiB zstd ;;
    nbdkit-S3 | text-nbdkit) start_nbdkit ;;
  esac
}
stop() { # SIGTERM (s3blk writes back what is dirty), wait, keep the peak RSS
  local hwm
  hwm=$(sed -n 's/^VmHWM:[[:space:]]*\([0-9]*\) kB/\1/p' "/proc/$server/status")
  [ "${hwm:-0}" -gt "$rss_max" ] && rss_max=$hwm
  kill -TERM "$server"
  while hwm=$(sed -n 's/^VmHWM:[[:space:]]*\([0-9]*\) kB/\1/p' "/proc/$server/status" 2>/dev/null) && [ -n "$hwm" ]; do
    [ "$hwm" -gt "$rss_max" ] && rss_max=$hwm
    grep -q '^State:[[:space:]]*Z' "/proc/$server/status" 2>/dev/null && break
    sleep 0.1
  done
  local status=0
  wait "$server" || status=$?
  [ "$status" = 0 ] || { cat "$work"/*.err >&2; fail "$system exited with status $status"; }
}

# --- the compressible data set: text files (already compressed ones left
# out) up to 60% of an ext4 image of S3BLK_BENCH_SEQ_MIB
text=$work/text.img
docs=${S3BLK_BENCH_TEXT_DIR:-/usr/share/doc}
"$py" - "$docs" "$work/docs" $((seq_mib * 6 / 10)) <<'PY'
import os, shutil, sys
src, dst, budget = sys.argv[1], sys.argv[2], int(sys.argv[3]) << 20
n = 0
for root, dirs, files in os.walk(src):
    dirs.sort()
    for f in sorted(files):
        p = os.path.join(root, f)
        if f.endswith((".gz", ".xz", ".bz2", ".zst", ".png", ".jpg", ".gif")) or os.path.islink(p):
            continue
        size = os.path.getsize(p)
        if n + size <= budget:
            os.makedirs(os.path.join(dst, os.path.relpath(root, src)), exist_ok=True)
            shutil.copyfile(p, os.path.join(dst, os.path.relpath(p, src)))
            n += size
PY
mkfs.ext4 -q -F -d "$work/docs" "$text" "${seq_mib}M" >/dev/null 2>&1 || fail "mkfs.ext4 -d $work/docs failed"
stored() { # bytes of every object under this endpoint's prefix of the system
  "$py" -c 'import boto3, json, sys
s3 = boto3.client("s3", endpoint_url=sys.argv[1])
n = 0
for page in s3.get_paginator("list_objects_v2").paginate(Bucket="bench", Prefix=sys.argv[2]):
    n += sum(o["Size"] for o in page.get("Contents", []))
print(json.dumps({"bytes": n, "written": int(sys.argv[3]) << 20}))' "http://127.0.0.1:$moto_port" "$endpoint/$system/" "$seq_mib"
}

# --- the jobs
drive() { /usr/bin/python3 bench/s3drive.py "$uri" "$@"; }
fio_job() { # scenario rw size-MiB extra-args...
  local scenario=$1 rw=$2 size=$3 before out=$work/fio.json
  shift 3
  before=$(counters)
  fio --name="$scenario" --ioengine=nbd --uri="$uri" --rw="$rw" --bs=4k --iodepth=32 --size="${size}m" \
    --output-format=json --output="$out" "$@" >/dev/null 2>"$work/fio.err" \
    || { cat "$work/fio.err" >&2; fail "fio $scenario on $system failed"; }
  local res
  res=$("$py" -c 'import json, sys
j = json.load(open(sys.argv[1]))["jobs"][0]
side = j["read"] if j["read"]["total_ios"] else j["write"]
print(json.dumps({"iops": side["iops"], "n": side["total_ios"]}))' "$out")
  record "$scenario" "$("$py" -c 'import json, sys; print(json.loads(sys.argv[1])["n"])' "$res")" "$res" "$before"
}
timed() { # scenario ops-or-"n" drive-args... (s3drive.py prints the result)
  local scenario=$1 ops=$2 before res
  shift 2
  before=$(counters)
  res=$(drive "$@") || fail "$scenario on $system failed"
  [ "$ops" = n ] && ops=$("$py" -c 'import json, sys; print(json.loads(sys.argv[1])["n"])' "$res")
  record "$scenario" "$ops" "$res" "$before"
}

for endpoint in direct proxy; do
  if [ "$endpoint" = direct ]; then url=http://127.0.0.1:$moto_port; else url=http://127.0.0.1:$proxy_port; fi
  system=ceiling
  echo "[$endpoint] ceiling" >&2
  before=$(counters)
  res=$("$py" bench/s3ceiling.py "$url" bench "$endpoint/ceiling" "$seq_mib" "$seconds") || fail "bench/s3ceiling.py failed"
  record ceiling 0 "$res" "$before"
  for system in s3blk-1M s3blk-64K nbdkit-S3; do
    echo "[$endpoint] $system" >&2
    rss_max=0
    start
    timed seqwrite "$seq_mib" seqwrite "$seq_mib" 8
    drive seqread "$hot_mib" 8 >/dev/null
    timed fsync n fsync "$hot_mib" "$seconds"
    fio_job randread-hot randread "$hot_mib" --time_based --runtime="$seconds"
    stop
    start
    timed seqread "$seq_mib" seqread "$seq_mib" 8
    stop
    start
    fio_job randread-cold randread "$seq_mib" --number_ios="$cold_reads"
    fio_job randwrite-cold randwrite "$vol_mib" --time_based --runtime="$seconds"
    stop
    record rss 0 "{\"kib\":$rss_max}" null
  done
  for system in text-none text-zstd text-nbdkit; do
    echo "[$endpoint] $system" >&2
    start
    export S3DRIVE_DATA=$text
    timed seqwrite-text "$seq_mib" seqwrite "$seq_mib" 8
    unset S3DRIVE_DATA
    stop
    record stored 0 "$(stored)" null
    start
    timed seqread-text "$seq_mib" seqread "$seq_mib" 8
    stop
  done
done

"$py" bench/s3report.py "$results" "$latency"
