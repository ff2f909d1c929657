#!/bin/bash
# Runs inside the VM (tests/vm/run.sh): the kernel's NBD client on an
# `s3blk serve` unix socket, ext4 on top, data verified across a detach,
# a server restart and a re-attach.
set -euo pipefail
bin=${S3BLK_BIN:?}
work=${TMPDIR:?}   # a tmpfs inside the guest
vol="$work/vols/kvol"
sock="$work/kvol.sock"
step() { echo "S3BLK-VM-STEP: $*"; }

serve() {
  "$bin" serve "$vol" --create --size 256MiB --listen "unix:$sock" >"$work/serve.log" 2>&1 &
  server=$!
  for _ in $(seq 200); do [ -S "$sock" ] && return 0; sleep 0.1; done
  cat "$work/serve.log"
  return 1
}

attach() {
  nbd-client -unix "$sock" -N kvol -b 4096 /dev/nbd0 -L >/dev/null
  for _ in $(seq 100); do
    [ "$(cat /sys/block/nbd0/size)" != 0 ] && return 0
    sleep 0.1
  done
  echo "nbd0 never got a size"
  return 1
}

detach() {
  nbd-client -d /dev/nbd0 >/dev/null
  for _ in $(seq 100); do
    [ "$(cat /sys/block/nbd0/size)" = 0 ] && return 0
    sleep 0.1
  done
}

stop_server() {
  kill -TERM "$server"
  wait "$server"
}

mkdir -p "$work/vols" "$work/mnt"
step "serve and attach"
serve
attach
[ "$(blockdev --getsize64 /dev/nbd0)" = $((256 << 20)) ] || { echo "wrong device size"; exit 1; }

step "mkfs.ext4, mount, write files"
mkfs.ext4 -q -F /dev/nbd0
mount /dev/nbd0 "$work/mnt"
head -c $((24 << 20)) /dev/urandom >"$work/mnt/big.bin"
for i in $(seq 1 200); do echo "file $i $(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')" >"$work/mnt/f$i.txt"; done
mkdir -p "$work/mnt/dir/sub" && cp "$work/mnt/f1.txt" "$work/mnt/dir/sub/copy.txt"
(cd "$work/mnt" && find . -type f ! -name sums -exec sha256sum {} + | sort -k2 >"$work/sums")
sync
umount "$work/mnt"
step "detach and stop the server (flushes and commits)"
detach
stop_server
"$bin" fsck "$vol" >"$work/fsck.log" || { cat "$work/fsck.log"; exit 1; }

step "serve again, re-attach, verify every file"
serve
attach
e2fsck -f -n /dev/nbd0 >"$work/e2fsck.log" 2>&1 || { cat "$work/e2fsck.log"; exit 1; }
mount /dev/nbd0 "$work/mnt"
(cd "$work/mnt" && sha256sum -c --quiet "$work/sums")
[ "$(find "$work/mnt" -type f | wc -l)" = 202 ] || { echo "file count differs"; exit 1; }

step "discard frees space: fstrim, then the freed chunks cost nothing"
rm "$work/mnt/big.bin"
# Freed blocks become trimmable once the ext4 journal has committed them.
sync
fstrim -v "$work/mnt"
umount "$work/mnt"
detach
stop_server
stored=$("$bin" volume inspect "$vol" --json | sed -n 's/.*"stored_chunks": \([0-9]*\).*/\1/p')
echo "stored chunks after fstrim: $stored"
[ "$stored" -lt 24 ] || { echo "fstrim did not release chunks ($stored stored)"; exit 1; }
"$bin" fsck "$vol" >"$work/fsck.log" || { cat "$work/fsck.log"; exit 1; }
echo "S3BLK-VM-RESULT: PASS"
