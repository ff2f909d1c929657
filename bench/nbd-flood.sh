#!/usr/bin/env bash
# A legitimate NBD client under a flood of hostile ones: `s3blk serve` on a
# local-directory store, a libnbd client that writes random 64 KiB blocks
# and reads each one back, first alone, then while a flooder keeps
#   - connections that send a maximum-size (32 MiB) WRITE header and no payload,
#   - connections that never say a word after connecting (stalled handshakes),
#   - connections that promise a 60 KB option and send 100 bytes of it,
#   - connect/close churn,
# open (each reconnects as soon as the server drops it). Prints the legit
# client's latency (p50/p99, flood/alone), its fresh connections refused,
# the server's peak RSS against its memory budget, and data mismatches
# (read-backs during the run, then every block re-read over a new
# connection at the end).
#
#   bench/nbd-flood.sh                       20 s per phase (about 50 s)
#   PHASE_SECONDS=120 bench/nbd-flood.sh     longer
#   TRANSPORT=tcp bench/nbd-flood.sh         127.0.0.1 instead of a unix socket
#   HEADERS=8 STALLED=16 PROMISERS=16 CHURN=4 MAX_CONNECTIONS=64  (the defaults)
#   S3BLK=target/debug/s3blk bench/nbd-flood.sh   skip the release build
set -euo pipefail
cd "$(dirname "$0")/.."
phase=${PHASE_SECONDS:-20}
transport=${TRANSPORT:-unix}
max_conn=${MAX_CONNECTIONS:-64}
/usr/bin/python3 -c 'import nbd' 2>/dev/null || { echo "bench needs python3-libnbd (./tests/run.sh installs it)" >&2; exit 1; }
bin=${S3BLK:-}
if [ -z "$bin" ]; then
  cargo build --release --quiet
  bin=./target/release/s3blk
fi
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

# The server's memory budget: request payloads and replies in flight
# (256 MiB across all connections), the read cache and the dirty limit.
cache=64 dirty=64 inflight=256
if [ "$transport" = tcp ]; then listen=127.0.0.1:0; else listen="unix:$work/s3blk.sock"; fi
"$bin" serve "$work/store/vol" --create --size 1GiB --cache-size ${cache}MiB --dirty-limit ${dirty}MiB \
  --max-connections "$max_conn" --listen "$listen" >"$work/serve.out" 2>"$work/serve.err" &
server=$!
pids+=("$server")
for _ in $(seq 100); do grep -q '^serving' "$work/serve.out" 2>/dev/null && break; sleep 0.1; done
address=$(sed -n 's/^serving .* on \([^,]*\), export.*/\1/p' "$work/serve.out")
[ -n "$address" ] || { echo "serve did not start:" >&2; cat "$work/serve.err" >&2; exit 1; }
case $address in
  unix:*) uri="nbd+unix:///vol?socket=${address#unix:}" ;;
  *) uri="nbd://$address/vol" ;;
esac
echo "s3blk serve ($bin) on $address, --max-connections $max_conn; ${phase}s alone, then ${phase}s under flood"

# The flooder: raw sockets, asyncio; runs until killed, then prints counts.
cat >"$work/flood.py" <<'PY'
import asyncio, os, signal, socket, struct, sys
address = sys.argv[1]
n_headers, n_stalled, n_promisers, n_churn = (int(os.environ.get(k, d)) for k, d in
    (("HEADERS", 8), ("STALLED", 16), ("PROMISERS", 16), ("CHURN", 4)))
IHAVEOPT, GO, WRITE, REQ = 0x49484156454F5054, 7, 1, 0x25609513
stats = {"connections": 0, "refused": 0, "header_only_writes": 0}
async def connect():
    if address.startswith("unix:"):
        r, w = await asyncio.open_unix_connection(address[5:])
    else:
        host, port = address.rsplit(":", 1)
        r, w = await asyncio.open_connection(host, int(port))
    stats["connections"] += 1
    return r, w
async def greeted():
    r, w = await connect()
    await r.readexactly(18)
    w.write(struct.pack(">I", 3))  # fixed newstyle, no zeroes
    return r, w
async def until_closed(r):
    while await r.read(65536):
        pass
async def forever(one):
    while True:
        try:
            await one()
        except (OSError, asyncio.IncompleteReadError):
            stats["refused"] += 1
            await asyncio.sleep(0.05)
async def header_only_write():
    r, w = await greeted()
    data = struct.pack(">I", 0) + struct.pack(">H", 0)  # empty name, no info requests
    w.write(struct.pack(">QII", IHAVEOPT, GO, len(data)) + data)
    while True:  # option replies until the ACK
        hdr = await r.readexactly(20)
        kind, n = struct.unpack(">II", hdr[12:20])
        await r.readexactly(n)
        if kind == 1:
            break
    w.write(struct.pack(">IHHQQI", REQ, 0, WRITE, 1, 0, 32 << 20))
    stats["header_only_writes"] += 1
    await until_closed(r)
async def stalled():
    r, w = await connect()
    await until_closed(r)
async def promiser():
    r, w = await greeted()
    w.write(struct.pack(">QII", IHAVEOPT, GO, 60000) + b"\0" * 100)
    await until_closed(r)
async def churn():
    r, w = await connect()
    w.close()
    await asyncio.sleep(0.01)
async def main():
    tasks = [forever(header_only_write) for _ in range(n_headers)]
    tasks += [forever(stalled) for _ in range(n_stalled)]
    tasks += [forever(promiser) for _ in range(n_promisers)]
    tasks += [forever(churn) for _ in range(n_churn)]
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    running = [asyncio.ensure_future(t) for t in tasks]
    await stop.wait()
    print(" ".join(f"{k}={v}" for k, v in stats.items()), flush=True)
    os._exit(0)
asyncio.run(main())
PY

# The legitimate client; it also starts and stops the flooder and samples
# the server's RSS.
/usr/bin/python3 - "$uri" "$address" "$phase" "$server" "$work" "$((cache + dirty + inflight))" <<'PY'
import hashlib, os, random, subprocess, sys, threading, time
import nbd
uri, address, phase, server, work, budget_mib = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4], sys.argv[5], int(sys.argv[6])
BLOCK, SLOTS = 64 << 10, 4096  # random 64 KiB blocks in the first 256 MiB
def rss_kib():
    for line in open(f"/proc/{server}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0
peak = {"alone": 0, "flood": 0}
phase_name = ["alone"]
def sampler():
    while True:
        try:
            peak[phase_name[0]] = max(peak[phase_name[0]], rss_kib())
        except OSError:
            return
        time.sleep(0.05)
base_rss = rss_kib()
threading.Thread(target=sampler, daemon=True).start()
def connect():
    h = nbd.NBD()
    h.connect_uri(uri)
    return h
h = connect()
model, mismatches = {}, 0
lat = {}
fresh = {}
def run(name, seconds):
    global mismatches
    phase_name[0] = name
    w, r = lat.setdefault((name, "write"), []), lat.setdefault((name, "read"), [])
    f = fresh.setdefault(name, [0, 0])
    end, next_fresh = time.monotonic() + seconds, time.monotonic()
    while time.monotonic() < end:
        slot = random.randrange(SLOTS)
        data = os.urandom(BLOCK)
        t0 = time.monotonic()
        h.pwrite(data, slot * BLOCK)
        t1 = time.monotonic()
        back = h.pread(BLOCK, slot * BLOCK)
        t2 = time.monotonic()
        w.append(t1 - t0)
        r.append(t2 - t1)
        model[slot] = hashlib.sha256(data).digest()
        if back != data:
            mismatches += 1
        if time.monotonic() >= next_fresh:  # a new client arriving: is it let in?
            next_fresh += 1.0
            f[0] += 1
            try:
                g = connect()
                g.shutdown()
            except nbd.Error:
                f[1] += 1
run("alone", phase)
flood = subprocess.Popen(["/usr/bin/python3", f"{work}/flood.py", address], stdout=subprocess.PIPE, text=True)
time.sleep(1)  # let the flood build up
run("flood", phase)
flood.terminate()
flood_stats = flood.communicate(timeout=30)[0].strip()
h.flush()
h.shutdown()
# Every block once more, over a new connection.
g = connect()
final_bad = sum(hashlib.sha256(g.pread(BLOCK, s * BLOCK)).digest() != d for s, d in model.items())
g.shutdown()
def pct(v, p):
    v = sorted(v)
    return v[min(len(v) - 1, int(len(v) * p))] * 1000 if v else float("nan")
print(f"flooder: {flood_stats}")
print(f"{'op':<7}{'phase':<7}{'ops':>7}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}")
for op in ("write", "read"):
    for name in ("alone", "flood"):
        v = lat[(name, op)]
        print(f"{op:<7}{name:<7}{len(v):>7}{pct(v, .5):>9.2f}{pct(v, .99):>9.2f}{max(v) * 1000:>9.1f}")
    a, b = lat[("alone", op)], lat[("flood", op)]
    print(f"{op:<7}{'ratio':<7}{'':>7}{pct(b, .5) / pct(a, .5):>9.2f}{pct(b, .99) / pct(a, .99):>9.2f}")
for name in ("alone", "flood"):
    tried, refused = fresh[name]
    print(f"fresh legit connections ({name}): {tried - refused}/{tried} served")
print(f"server RSS: start {base_rss / 1024:.0f} MiB, peak alone {peak['alone'] / 1024:.0f} MiB, "
      f"peak under flood {peak['flood'] / 1024:.0f} MiB; budget start + {budget_mib} MiB "
      f"(in flight 256 + cache + dirty) = {base_rss / 1024 + budget_mib:.0f} MiB "
      f"{'ok' if peak['flood'] / 1024 <= base_rss / 1024 + budget_mib else 'OVER'}")
print(f"data mismatches: {mismatches} during the run, {final_bad} of {len(model)} blocks re-read at the end")
sys.exit(1 if mismatches or final_bad else 0)
PY
