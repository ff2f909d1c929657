#!/usr/bin/env bash
# Random reads that miss the cache: `s3blk serve` on the local-directory
# store against `nbdkit file` on a raw file of the same size, measured in
# the same run on the same machine, printed as one table.
#
#   bench/local.sh [SECONDS-PER-JOB]     (default 10)
#   S3BLK=target/debug/s3blk             skip the release build
#
# The volume (WORKING_SET, default 256 MiB of 1 MiB chunks) is twice
# s3blk's default cache (128 MiB), so about half the random reads miss it
# and fetch from the chunk objects (files in the page cache, as nbdkit's
# raw file is). Target (issue 13): randread 4k s3blk/nbdkit >= 0.5.
set -euo pipefail
cd "$(dirname "$0")/.."
runtime=${1:-10}
size=${WORKING_SET:-256M}
for t in fio nbdkit; do command -v "$t" >/dev/null || { echo "bench needs $t (./tests/run.sh installs it)" >&2; exit 1; }; done
bin=${S3BLK:-}
if [ -z "$bin" ]; then
  cargo build --release --quiet
  bin=./target/release/s3blk
fi
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT
mkdir -p "$work/store"
truncate -s "$size" "$work/raw.img"

serve() { # start s3blk serve on the volume (created on the first call)
  rm -f "$work/s3blk.sock"
  "$bin" serve "file://$work/store/bench" "$@" --listen "unix:$work/s3blk.sock" >>"$work/s3blk.log" 2>&1 &
  s3blk_pid=$!
  pids+=("$s3blk_pid")
  for _ in $(seq 100); do [ -S "$work/s3blk.sock" ] && break; sleep 0.1; done
}
serve --create --size "$size"
nbdkit -f -U "$work/nbdkit.sock" file "$work/raw.img" >/dev/null 2>&1 &
pids+=($!)
for _ in $(seq 100); do [ -S "$work/nbdkit.sock" ] && break; sleep 0.1; done

echo "s3blk serve file://… (cache 128 MiB, the default) vs nbdkit file; fio nbd engine, ${runtime}s per job, working set $size"
echo "$(nproc) CPUs; $(date -u '+%Y-%m-%d %H:%M UTC'); commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
uri() { if [ "$1" = s3blk ]; then echo "nbd+unix:///bench?socket=$work/s3blk.sock"; else echo "nbd+unix:///?socket=$work/nbdkit.sock"; fi; }
run_fio() { # target name rw bs qd [time_based]
  local target=$1 name=$2 rw=$3 bs=$4 qd=$5
  local timed=(--time_based --runtime="$runtime" --ramp_time=1)
  [ "$name" = fill ] && timed=(--end_fsync=1)
  fio --name="$name" --ioengine=nbd --uri="$(uri "$target")" --rw="$rw" --bs="$bs" --iodepth="$qd" \
    --size="$size" "${timed[@]}" --group_reporting --randrepeat=0 \
    --output-format=json --output="$work/$target-$name.json" >/dev/null 2>&1
}
# Fill both with data (fio flushes at the end of the job), then start
# s3blk again: its cache starts cold, every chunk is an object on disk.
for target in s3blk nbdkit; do run_fio "$target" fill write 1m 8; done
kill "$s3blk_pid"
wait "$s3blk_pid" 2>/dev/null || true
serve

# name rw bs iodepth
jobs=(
  "randread-4k-qd1 randread 4k 1"
  "randread-4k-qd32 randread 4k 32"
  "randread-64k-qd8 randread 64k 8"
)
for job in "${jobs[@]}"; do
  read -r name rw bs qd <<<"$job"
  for target in s3blk nbdkit; do run_fio "$target" "$name" "$rw" "$bs" "$qd"; done
done
rss=$(awk '/VmHWM/ {print int($2 / 1024)}' "/proc/$s3blk_pid/status" 2>/dev/null || echo '?')

python3 - "$work" "$rss" "${jobs[@]}" <<'PY'
import json, sys
work, rss, jobs = sys.argv[1], sys.argv[2], sys.argv[3:]
def result(target, name):
    j = json.load(open(f"{work}/{target}-{name}.json"))["jobs"][0]
    return j["read"]["iops"], j["read"]["bw"] / 1024
print(f"{'job':<20}{'metric':>8}{'s3blk':>12}{'nbdkit':>12}{'ratio':>8}  target")
for job in jobs:
    name, rw, bs = job.split()[:3]
    (si, sb), (ni, nb) = result("s3blk", name), result("nbdkit", name)
    metric, s, n = ("IOPS", si, ni) if bs == "4k" else ("MB/s", sb, nb)
    ratio = s / n if n else float("nan")
    verdict = f">=0.5 {'ok' if ratio >= 0.5 else 'BELOW'}" if bs == "4k" else "-"
    print(f"{name:<20}{metric:>8}{s:>12.0f}{n:>12.0f}{ratio:>8.2f}  {verdict}")
print(f"s3blk peak RSS (VmHWM) after the reads: {rss} MiB")
PY
