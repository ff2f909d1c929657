#!/usr/bin/env bash
# Boot a real Debian kernel under QEMU (software emulation) and run a guest
# script with the host's root filesystem mounted read-only over 9p, so the
# guest uses the same binaries (s3blk, nbd-client, mkfs) as the host.
#
#   tests/vm/run.sh GUEST-SCRIPT S3BLK-BINARY [TIMEOUT-SECONDS [TEST-BINARY]]
#
# The guest script's output appears on stdout; the last line is
# "S3BLK-VM-EXIT: <status>". Kernel and initramfs are cached in target/vm.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
work="$repo/target/vm"
script=$(realpath "$1")
bin=$(realpath "$2")
timeout_s=${3:-600}
test_bin=${4:+$(realpath "$4")}
mkdir -p "$work"

# --- kernel: the current Debian kernel package, unpacked, never installed.
if [ ! -s "$work/kernel.version" ]; then
  pkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
  [ -n "$pkg" ] || { echo "cannot find a Debian kernel package" >&2; exit 1; }
  rm -rf "$work/kroot" "$work"/linux-image-*.deb
  (cd "$work" && apt-get download "$pkg" >/dev/null 2>&1) || { echo "apt-get download $pkg failed" >&2; exit 1; }
  dpkg -x "$work"/linux-image-*.deb "$work/kroot"
  kver=${pkg#linux-image-}
  depmod -b "$work/kroot" "$kver"
  echo "$kver" >"$work/kernel.version"
fi
kver=$(cat "$work/kernel.version")
kernel="$work/kroot/boot/vmlinuz-$kver"

# --- initramfs: static busybox, the modules the guest needs, and /init.
if [ ! -s "$work/initrd.img" ] || [ "$here/run.sh" -nt "$work/initrd.img" ]; then
  ird=$(mktemp -d)
  trap 'rm -rf "$ird"' EXIT
  mkdir -p "$ird"/{bin,dev,proc,sys,host,modules}
  cp "$(command -v busybox)" "$ird/bin/busybox"
  n=0
  for mod in crc32c_generic nbd ext4 xfs virtio_pci 9pnet_virtio 9p; do
    while read -r kind path _; do
      [ "$kind" = insmod ] || continue
      name=$(basename "$path")
      if ! ls "$ird/modules/"*"-$name" >/dev/null 2>&1; then
        n=$((n + 1))
        cp "$path" "$ird/modules/$(printf '%02d' "$n")-$name"
      fi
    done < <(modprobe -d "$work/kroot" -S "$kver" --show-depends "$mod")
  done
  cat >"$ird/init" <<'INIT'
#!/bin/busybox sh
bb=/bin/busybox
$bb mount -t proc proc /proc
$bb mount -t sysfs sys /sys
$bb mount -t devtmpfs dev /dev
exec </dev/console >/dev/console 2>&1
for m in /modules/*.ko; do $bb insmod "$m" 2>/dev/null; done
$bb mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=262144 host /host || echo "S3BLK-VM-EXIT: 9p mount failed"
for d in dev proc sys; do $bb mount --bind /$d /host/$d; done
# Scratch space lives on /run: the host's /tmp stays visible, since the
# checkout (and so the script and binary) may be under it.
$bb mount -t tmpfs run /host/run
script=$($bb sed -n 's/.*s3blk\.script=\([^ ]*\).*/\1/p' /proc/cmdline)
bin=$($bb sed -n 's/.*s3blk\.bin=\([^ ]*\).*/\1/p' /proc/cmdline)
test_bin=$($bb sed -n 's/.*s3blk\.test=\([^ ]*\).*/\1/p' /proc/cmdline)
$bb mkdir -p /host/run/s3blk-vm
S3BLK_TEST_BIN="$test_bin" S3BLK_BIN="$bin" TMPDIR=/run/s3blk-vm HOME=/run/s3blk-vm PATH=/usr/sbin:/usr/bin:/sbin:/bin $bb chroot /host /bin/bash "$script"
echo "S3BLK-VM-EXIT: $?"
$bb sync
$bb poweroff -f
INIT
  chmod +x "$ird/init"
  (cd "$ird" && find . | cpio -o -H newc --quiet | gzip -1) >"$work/initrd.img.tmp"
  mv "$work/initrd.img.tmp" "$work/initrd.img"
fi

# --- boot. No network: everything the scenario needs runs inside the guest.
exec timeout --kill-after=10 "$timeout_s" qemu-system-x86_64 \
  -machine q35,accel=tcg -smp 2 -m 1536 -nographic -no-reboot -nic none \
  -kernel "$kernel" -initrd "$work/initrd.img" \
  -virtfs "local,path=/,mount_tag=host,security_model=none,readonly=on,multidevs=remap" \
  -append "console=ttyS0 panic=-1 quiet loglevel=3 s3blk.script=$script s3blk.bin=$bin${test_bin:+ s3blk.test=$test_bin}"
