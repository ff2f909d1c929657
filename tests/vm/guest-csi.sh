#!/bin/bash
# Runs inside the VM (tests/vm/run.sh): the CSI node lifecycle test, which
# is part of the tests/csi_node.rs binary and runs only inside the guest.
set -euo pipefail
: "${S3BLK_BIN:?}" "${S3BLK_TEST_BIN:?}"
export S3BLK_IN_VM=1
"$S3BLK_TEST_BIN" --exact node_lifecycle_inside_vm --ignored --nocapture --test-threads 1
echo "S3BLK-VM-RESULT: PASS"
