#!/bin/bash
# Runs inside the VM (tests/vm/run.sh): the CSI node tests of the
# tests/csi_node.rs binary that run only inside the guest: the lifecycle,
# a plugin crash with writes in flight, stage mounts of clones, restores
# and checked filesystems, the plugin in a network namespace of its own
# (a pod without hostNetwork), the plugin as the chart's DaemonSet
# runs it, and a stage its caller gives up on.
set -euo pipefail
: "${S3BLK_BIN:?}" "${S3BLK_TEST_BIN:?}"
export S3BLK_IN_VM=1
"$S3BLK_TEST_BIN" --ignored --nocapture --test-threads 1 --exact \
  node_lifecycle_inside_vm plugin_crash_never_loses_fsynced_writes_silently_inside_vm \
  stage_mounts_clones_restores_and_checks_filesystems_inside_vm node_in_its_own_network_namespace_inside_vm \
  node_as_the_chart_ships_it_inside_vm a_node_stage_its_caller_gives_up_on_finishes_once_inside_vm
echo "S3BLK-VM-RESULT: PASS"
