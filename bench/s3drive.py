"""NBD client for bench/s3.sh (Debian's python3 with python3-libnbd).

    s3drive.py URI seqwrite MIB QD   1 MiB writes from offset 0, QD in flight, then one FLUSH
    s3drive.py URI seqread MIB QD    1 MiB reads from offset 0, QD in flight
    s3drive.py URI fsync MIB SECONDS a 4 KiB write at a random 4 KiB-aligned offset
                                     below MIB, then FLUSH, one pair at a time, for SECONDS

With S3DRIVE_DATA=FILE, seqwrite writes FILE's bytes (from its start, over
again if MIB is longer) instead of random ones: a compressible data set.

Prints one JSON object: seconds and mbps for seqwrite/seqread (the FLUSH
is inside the time), n, p50_ms and p99_ms of the write+FLUSH pairs for fsync.
"""

import json
import os
import random
import sys
import time

import nbd

uri, mode, mib, arg = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
h = nbd.NBD()
# Servers may advertise a minimum block size above 4 KiB (the nbdkit S3
# plugin says 64 KiB and does a read-modify-write below it); send 4 KiB anyway.
h.set_strict_mode(h.get_strict_mode() & ~nbd.STRICT_ALIGN)
h.connect_uri(uri)
MiB = 1 << 20


def piece(whole, i):
    """The i-th MiB of `whole` repeated end to end."""
    start, out = (i * MiB) % len(whole), bytearray()
    while len(out) < MiB:
        out += whole[start:start + MiB - len(out)]
        start = 0
    return out


def sequential(write, qd):
    """MIB 1 MiB commands, qd in flight; returns seconds (a write run ends with FLUSH)."""
    source = os.environ.get("S3DRIVE_DATA")
    if source:
        whole = open(source, "rb").read()
        datas = [nbd.Buffer.from_bytearray(piece(whole, i)) for i in range(mib)]
    else:
        datas = [nbd.Buffer.from_bytearray(bytearray(os.urandom(MiB)))]
    bufs = [nbd.Buffer(MiB) for _ in range(qd)]
    free = list(range(qd))
    inflight = {}
    submitted = done = 0
    start = time.monotonic()
    while done < mib:
        while free and submitted < mib:
            slot = free.pop()
            if write:
                cookie = h.aio_pwrite(datas[submitted % len(datas)], submitted * MiB)
            else:
                cookie = h.aio_pread(bufs[slot], submitted * MiB)
            inflight[cookie] = slot
            submitted += 1
        h.poll(-1)
        for cookie in [c for c in inflight if h.aio_command_completed(c)]:
            free.append(inflight.pop(cookie))
            done += 1
    if write:
        h.flush()
    return time.monotonic() - start


if mode in ("seqwrite", "seqread"):
    if mib * MiB > h.get_size():
        sys.exit(f"s3drive: {mib} MiB do not fit in the export ({h.get_size()} bytes)")
    seconds = sequential(mode == "seqwrite", int(arg))
    print(json.dumps({"seconds": seconds, "mbps": mib * MiB / 1e6 / seconds}))
elif mode == "fsync":
    blocks = min(mib * MiB, h.get_size()) // 4096
    rng = random.Random(13)
    block = os.urandom(4096)
    lat = []
    stop = time.monotonic() + arg
    while time.monotonic() < stop:
        t0 = time.monotonic()
        h.pwrite(block, rng.randrange(blocks) * 4096)
        h.flush()
        lat.append((time.monotonic() - t0) * 1000)
    lat.sort()
    print(json.dumps({"n": len(lat), "p50_ms": lat[len(lat) // 2],
                      "p99_ms": lat[min(len(lat) - 1, len(lat) * 99 // 100)]}))
else:
    sys.exit(f"s3drive: unknown mode {mode}")
h.shutdown()
