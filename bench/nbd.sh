#!/usr/bin/env bash
# fio over NBD: `s3blk serve` on an in-memory store against `nbdkit memory`,
# measured in the same run on the same machine, printed as one table.
#
#   bench/nbd.sh [SECONDS-PER-JOB]     (default 10)
#
# Targets: s3blk/nbdkit >= 1.0 for reads and >= 0.8 for writes.
#
# nbdkit's memory plugin holds every byte in RAM, so by default s3blk gets a
# cache and dirty limit that hold the 1 GiB working set too: the comparison
# measures the NBD server and the engine, not the store. COLD=1 uses the
# defaults (128 MiB cache, 256 MiB dirty limit): random 4 KiB I/O then
# read-modify-writes whole 1 MiB chunks.
#
# A second table runs the same kinds of job on a compressible data set
# (fio's buffers, 70% of each 4 KiB compressible): s3blk on the
# local-directory store with compression none and zstd (the same cache
# and dirty limit) against `nbdkit memory`, and the bytes each volume
# stores once its server wrote everything back and it was compacted.
# COMPRESSIBLE=0 skips it.
set -euo pipefail
cd "$(dirname "$0")/.."
runtime=${1:-10}
for t in fio nbdkit; do command -v "$t" >/dev/null || { echo "bench needs $t (./tests/run.sh installs it)" >&2; exit 1; }; done
cargo build --release --quiet
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

if [ "${COLD:-0}" = 1 ]; then sizing=(); else sizing=(--cache-size 2GiB --dirty-limit 1536MiB); fi
echo "s3blk serve memory://bench ${sizing[*]} vs nbdkit memory 2G; fio nbd engine, ${runtime}s per job, 1 GiB working set"
./target/release/s3blk serve memory://bench --create --size 2GiB "${sizing[@]}" --listen "unix:$work/s3blk.sock" >/dev/null 2>&1 &
pids+=($!)
nbdkit -f -U "$work/nbdkit.sock" memory 2G >/dev/null 2>&1 &
pids+=($!)
for s in s3blk nbdkit; do
  for _ in $(seq 100); do [ -S "$work/$s.sock" ] && break; sleep 0.1; done
done

# name rw bs iodepth numjobs
jobs=(
  "randread-4k-qd1 randread 4k 1 1"
  "randread-4k-qd32 randread 4k 32 1"
  "randwrite-4k-qd1 randwrite 4k 1 1"
  "randwrite-4k-qd32 randwrite 4k 32 1"
  "seqread-1m read 1m 8 1"
  "seqwrite-1m write 1m 8 1"
)
run_fio() { # target job...
  local target=$1 name=$2 rw=$3 bs=$4 qd=$5 nj=$6 uri
  if [ "$target" = s3blk ]; then uri="nbd+unix:///bench?socket=$work/s3blk.sock"; else uri="nbd+unix:///?socket=$work/nbdkit.sock"; fi
  fio --name="$name" --ioengine=nbd --uri="$uri" --rw="$rw" --bs="$bs" --iodepth="$qd" --numjobs="$nj" \
    --size=1g --time_based --runtime="$runtime" --ramp_time=1 --group_reporting \
    --output-format=json --output="$work/$target-$name.json" >/dev/null 2>&1
}
# Fill the region once on both so reads hit real data.
for target in s3blk nbdkit; do run_fio "$target" fill write 1m 8 1 || true; done
for job in "${jobs[@]}"; do
  read -r name rw bs qd nj <<<"$job"
  for target in s3blk nbdkit; do run_fio "$target" "$name" "$rw" "$bs" "$qd" "$nj"; done
done

python3 - "$work" "${jobs[@]}" <<'PY'
import json, sys
work, jobs = sys.argv[1], sys.argv[2:]
def result(target, name):
    j = json.load(open(f"{work}/{target}-{name}.json"))["jobs"][0]
    side = j["read"] if j["read"]["io_bytes"] > 0 else j["write"]
    return side["iops"], side["bw"] / 1024
print(f"{'job':<20}{'metric':>8}{'s3blk':>12}{'nbdkit':>12}{'ratio':>8}  target")
for job in jobs:
    name, rw, bs = job.split()[:3]
    (si, sb), (ni, nb) = result("s3blk", name), result("nbdkit", name)
    metric, s, n = ("MB/s", sb, nb) if bs == "1m" else ("IOPS", si, ni)
    target = 1.0 if "read" in rw else 0.8
    ratio = s / n if n else float("nan")
    print(f"{name:<20}{metric:>8}{s:>12.0f}{n:>12.0f}{ratio:>8.2f}  >={target} {'ok' if ratio >= target else 'BELOW'}")
PY

[ "${COMPRESSIBLE:-1}" = 1 ] || exit 0
# --- compressible data: s3blk (none, zstd) on the local-directory store vs
# nbdkit memory, one server at a time (each writes back through its
# write-back log while it runs, which would slow the others' jobs)
kill "${pids[0]}" 2>/dev/null || true
wait "${pids[0]}" 2>/dev/null || true
compress=(--buffer_compress_percentage=70 --buffer_compress_chunk=4k --refill_buffers)
uri_c() { case $1 in nbdkit) echo "nbd+unix:///?socket=$work/nbdkit.sock" ;; *) echo "nbd+unix:///$1?socket=$work/s3blk-$1.sock" ;; esac; }
run_fio_c() { # target job...
  local target=$1 name=$2 rw=$3 bs=$4 qd=$5
  fio --name="$name" --ioengine=nbd --uri="$(uri_c "$target")" --rw="$rw" --bs="$bs" --iodepth="$qd" --numjobs=1 \
    --size=1g --time_based --runtime="$runtime" --ramp_time=1 --group_reporting "${compress[@]}" \
    --output-format=json --output="$work/c-$target-$name.json" >/dev/null 2>&1
}
cjobs=(
  "seqwrite-1m write 1m 8"
  "seqread-1m read 1m 8"
  "randread-4k-qd32 randread 4k 32"
  "randwrite-4k-qd32 randwrite 4k 32"
)
stored() { find "$work/cstore/$1" -type f -printf '%s\n' | awk '{ s += $1 } END { printf "%d\n", s }'; }
stored_bytes=()
for target in none zstd nbdkit; do
  if [ "$target" != nbdkit ]; then
    ./target/release/s3blk serve "file://$work/cstore/$target" --create --size 2GiB --compression "$target" \
      "${sizing[@]}" --listen "unix:$work/s3blk-$target.sock" >/dev/null 2>&1 &
    pid=$!
    pids+=("$pid")
    for _ in $(seq 100); do [ -S "$work/s3blk-$target.sock" ] && break; sleep 0.1; done
  fi
  fio --name=fill --ioengine=nbd --uri="$(uri_c "$target")" --rw=write --bs=1m --iodepth=8 --size=1g "${compress[@]}" \
    >/dev/null 2>&1 || true
  for job in "${cjobs[@]}"; do
    read -r name rw bs qd <<<"$job"
    run_fio_c "$target" "$name" "$rw" "$bs" "$qd"
  done
  if [ "$target" != nbdkit ]; then
    # SIGTERM: the server writes back what is dirty; then the store holds everything.
    kill -TERM "$pid"
    wait "$pid" || true
    # Chunk generations no record names any more go (as the controller's
    # compaction takes them), then what is left is what the volume stores.
    ./target/release/s3blk compact "file://$work/cstore/$target" --safety-age 0 >/dev/null 2>&1 || true
    stored_bytes+=("$(stored "$target")")
  fi
done
python3 - "$work" "${stored_bytes[0]}" "${stored_bytes[1]}" "${cjobs[@]}" <<'PY'
import json, sys
work, plain, packed, jobs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
def result(target, name):
    j = json.load(open(f"{work}/c-{target}-{name}.json"))["jobs"][0]
    side = j["read"] if j["read"]["io_bytes"] > 0 else j["write"]
    return side["iops"], side["bw"] / 1024
print("\ncompressible data (fio buffers, 70% compressible), one server at a time: s3blk on the local-directory store, compression none and zstd, vs nbdkit memory")
print(f"{'job':<20}{'metric':>8}{'none':>10}{'zstd':>10}{'nbdkit':>10}{'zstd/nbdkit':>13}{'zstd/none':>11}")
for job in jobs:
    name, rw, bs = job.split()[:3]
    (pi, pb), (zi, zb), (ni, nb) = result("none", name), result("zstd", name), result("nbdkit", name)
    metric, p, z, n = ("MB/s", pb, zb, nb) if bs == "1m" else ("IOPS", pi, zi, ni)
    r = lambda a, b: f"{a / b:.2f}" if b else "-"
    print(f"{name:<20}{metric:>8}{p:>10.0f}{z:>10.0f}{n:>10.0f}{r(z, n):>13}{r(z, p):>11}")
print(f"{'bytes stored':<20}{'MiB':>8}{plain / 2**20:>10.0f}{packed / 2**20:>10.0f}{'-':>10}{'-':>13}{packed / plain if plain else float('nan'):>11.2f}")
PY
