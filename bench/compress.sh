#!/usr/bin/env bash
# Compression on a compressible data set: a fresh ext4 image holding text
# (the machine's /usr/share/doc, made with mkfs.ext4 -d, no root needed),
# imported into volumes on the local-directory store with compression
# none, lz4 and zstd, measured in the same run: bytes stored, import
# (write + flush) and cold export throughput, and hot 4 KiB random reads
# through `s3blk serve` (fio nbd engine, served from the cache after a
# warm-up pass) with each ratio against the uncompressed volume. The
# issue's bar: hot reads must not get slower.
#
#   bench/compress.sh [SECONDS-PER-JOB]   (default 10)
#   S3BLK=target/debug/s3blk              skip the release build
#   IMAGE_SIZE=256M                       the ext4 image's size
set -euo pipefail
cd "$(dirname "$0")/.."
runtime=${1:-10}
size=${IMAGE_SIZE:-256M}
for t in fio mkfs.ext4; do command -v "$t" >/dev/null || { echo "bench needs $t (./tests/run.sh installs it)" >&2; exit 1; }; done
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
docs=${DATA_DIR:-/usr/share/doc}
mkfs.ext4 -q -F -d "$docs" "$work/image.img" "$size" >/dev/null 2>&1 ||
  { echo "$docs does not fit in $size: set IMAGE_SIZE or DATA_DIR" >&2; exit 1; }
bytes=$(stat -c %s "$work/image.img")
echo "compressible data set: ext4 image of $size holding $docs (text), local-directory store, fio ${runtime}s per job"
echo "$(nproc) CPUs; $(date -u '+%Y-%m-%d %H:%M UTC'); commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"

now() { date +%s.%N; }
# Encrypted rows ("-enc"): the same, sealed with a key (see README, "Encryption").
head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$work/key"
results=()
for c in none lz4 zstd none-enc zstd-enc; do
  vol="file://$work/store/$c"
  key=()
  create=(--create --compression "${c%-enc}")
  if [ "${c%-enc}" != "$c" ]; then
    key=(--key-file "$work/key")
    create+=(--encrypt)
  fi
  t0=$(now)
  "$bin" "${key[@]}" volume import "$vol" "$work/image.img" "${create[@]}" >/dev/null 2>&1
  t1=$(now)
  "$bin" "${key[@]}" volume export "$vol" "$work/back.img" >/dev/null 2>&1
  t2=$(now)
  cmp -s "$work/image.img" "$work/back.img" || { echo "$c: the export differs from the image" >&2; exit 1; }
  rm -f "$work/back.img"
  stored=$(find "$work/store/$c/chunks" -type f -printf '%s\n' | awk '{ s += $1 } END { print s + 0 }')
  sock="$work/$c.sock"
  "$bin" "${key[@]}" serve "$vol" --listen "unix:$sock" --cache-size 1GiB >>"$work/serve.log" 2>&1 &
  pid=$!
  pids+=("$pid")
  for _ in $(seq 100); do [ -S "$sock" ] && break; sleep 0.1; done
  uri="nbd+unix:///$c?socket=$sock"
  # Warm the cache with one sequential pass, then random 4 KiB reads.
  fio --name=warm --ioengine=nbd --uri="$uri" --rw=read --bs=1m --iodepth=8 --size="$size" \
    --output-format=json --output="$work/$c-warm.json" >/dev/null 2>&1
  fio --name=hot --ioengine=nbd --uri="$uri" --rw=randread --bs=4k --iodepth=32 --size="$size" \
    --time_based --runtime="$runtime" --ramp_time=1 --randrepeat=0 \
    --output-format=json --output="$work/$c-hot.json" >/dev/null 2>&1
  kill "$pid"
  wait "$pid" 2>/dev/null || true
  results+=("$c $stored $(awk "BEGIN { print $t1 - $t0 }") $(awk "BEGIN { print $t2 - $t1 }")")
done

python3 - "$work" "$bytes" "${results[@]}" <<'PY'
import json, sys
work, total, rows = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
def hot(c):
    return json.load(open(f"{work}/{c}-hot.json"))["jobs"][0]["read"]["iops"]
base = {}
print(f"{'compression':<12}{'stored MiB':>12}{'of image':>10}{'import MB/s':>13}{'export MB/s':>13}{'hot 4k IOPS':>13}{'vs none':>9}")
for row in rows:
    c, stored, t_imp, t_exp = row.split()
    stored, t_imp, t_exp = int(stored), float(t_imp), float(t_exp)
    iops = hot(c)
    base.setdefault("iops", iops)
    print(f"{c:<12}{stored / 2**20:>12.1f}{stored / total:>10.2f}{total / t_imp / 1e6:>13.0f}"
          f"{total / t_exp / 1e6:>13.0f}{iops:>13.0f}{iops / base['iops']:>9.2f}")
print("hot reads must not get slower: 'vs none' >= about 1.0 (run-to-run noise is a few per cent);")
print("-enc rows are encrypted (sealed frames of 16 KiB): hot reads are served from the cache in the clear")
PY
