#!/usr/bin/env bash
# Long runs of the deterministic simulation (tests/simulation.rs): seeds
# for a given time (or a given count), on several threads, in release mode.
# Every failing seed is printed with the command that replays it; the whole
# output also goes to a log. Exits non-zero when any seed failed.
#
#   scripts/simulate.sh [SECONDS]            default 3600
#   S3BLK_SIM_SEEDS=N scripts/simulate.sh     N seeds instead of a time limit
#   S3BLK_SIM_FIRST=N                         first seed (random by default)
#   S3BLK_SIM_THREADS=N                       parallel seeds (default: all cores)
#   S3BLK_SIM_STOP=1                          stop at the first failing seed
#   S3BLK_SIM_PROFILE=dev                     skip the release build
#   S3BLK_SIM_LOG=FILE                        log (default target/simulate-<time>.log)
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${1:-3600}
profile=${S3BLK_SIM_PROFILE:-release}
threads=${S3BLK_SIM_THREADS:-$(nproc)}
log=${S3BLK_SIM_LOG:-target/simulate-$(date +%Y%m%d-%H%M%S).log}
mkdir -p "$(dirname "$log")"

args=(--test simulation)
[ "$profile" = release ] && args+=(--release)
cargo test "${args[@]}" --no-run

if [ -z "${S3BLK_SIM_SEEDS:-}" ]; then
    export S3BLK_SIM_SECONDS=$seconds
fi
export S3BLK_SIM_THREADS=$threads
echo "simulating: ${S3BLK_SIM_SEEDS:-as many seeds as fit in $seconds s}, $threads threads, $profile build; log $log"
status=0
cargo test "${args[@]}" -- simulation --exact --nocapture 2>&1 | tee "$log" || status=$?
echo "log: $log"
exit "$status"
