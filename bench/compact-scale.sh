#!/usr/bin/env bash
# Compaction of a 64 TiB volume (64 M chunks of 1 MiB) and its peak memory:
# tests/compact_scale.rs at full size, on its synthetic store (the chunk
# listing and the checkpoint's parts are generated, so only compaction's
# own memory counts). Target (issue 13): peak RSS growth under 256 MiB.
#
#   bench/compact-scale.sh [CHUNKS]        (default 67108864)
#   S3BLK_BENCH_PROFILE=dev                skip the release build
#
# The parts compaction writes (two checkpoints of 512 parts, about 2 GB)
# go to a temporary directory and are checked against the map they must
# hold, then removed.
set -euo pipefail
cd "$(dirname "$0")/.."
chunks=${1:-67108864}
args=(--test compact_scale)
[ "${S3BLK_BENCH_PROFILE:-release}" = release ] && args+=(--release)
S3BLK_SCALE_CHUNKS=$chunks S3BLK_SCALE_RSS_MIB=${S3BLK_SCALE_RSS_MIB:-256} \
  cargo test "${args[@]}" -- --nocapture --test-threads 1 2>&1 | grep -oE 'compacted [0-9].*|panicked.*|test result.*'
