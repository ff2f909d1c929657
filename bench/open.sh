#!/usr/bin/env bash
# How long opening a big volume takes, on a moto server this script starts:
# a volume of S3BLK_BENCH_CHUNKS (default 1,048,576) mapped 1 MiB chunks,
# i.e. 1 TiB, its map in a split checkpoint (examples/open_bench.rs). Prints
# the checkpoint's objects and size, and the median of three read-only
# opens and one writer's open against the 2 s target.
#
#   bench/open.sh
#   S3BLK_BENCH_CHUNKS=1048576
#   S3BLK_BENCH_DEBUG=1          a debug build (quicker to build, slower to run)
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${VIRTUAL_ENV:-.venv}
[ -x "$venv/bin/moto_server" ] || { echo "bench/open.sh needs moto's server in $venv (python -m venv .venv && .venv/bin/pip install 'moto[server]')" >&2; exit 1; }
command -v curl >/dev/null || { echo "bench/open.sh needs curl" >&2; exit 1; }
if [ -n "${S3BLK_BENCH_DEBUG:-}" ]; then
  cargo build --quiet --example open_bench
  bin=./target/debug/examples/open_bench
else
  cargo build --release --quiet --example open_bench
  bin=./target/release/examples/open_bench
fi
work=$(mktemp -d)
port=$("$venv/bin/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$venv/bin/moto_server" -H 127.0.0.1 -p "$port" >"$work/moto.log" 2>&1 &
moto=$!
trap 'kill $moto 2>/dev/null || true; rm -rf "$work"' EXIT
for _ in $(seq 100); do curl -s -o /dev/null "http://127.0.0.1:$port/" && break; sleep 0.2; done
curl -s -o /dev/null "http://127.0.0.1:$port/" || { echo "moto did not start:" >&2; cat "$work/moto.log" >&2; exit 1; }
echo "moto $("$venv/bin/python" -c 'import moto; print(moto.__version__)') on 127.0.0.1:$port; $(nproc) CPUs; $(date -u '+%Y-%m-%d %H:%M UTC')"
S3BLK_BENCH_ENDPOINT="http://127.0.0.1:$port" "$bin"
