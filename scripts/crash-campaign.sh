#!/usr/bin/env bash
# The long form of the black-box crash campaign (tests/crash_campaign.rs):
# SIGKILL `s3blk serve` on moto at random moments, CYCLES times (default 200).
# Usage: scripts/crash-campaign.sh [CYCLES] [SEED]
set -euo pipefail
cd "$(dirname "$0")/.."
export S3BLK_CRASH_CYCLES="${1:-200}"
if [ -n "${2:-}" ]; then export S3BLK_CRASH_SEED="$2"; fi
exec cargo test --test crash_campaign -- --nocapture
