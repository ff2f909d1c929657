#!/usr/bin/env bash
# Install everything the test suite needs, start a real S3 server (moto),
# and run every test. Usage: ./tests/run.sh [extra cargo-nextest arguments]
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '==> %s\n' "$*" >&2; }

# --- Debian packages: real NBD clients, filesystems, QEMU for the kernel test.
declare -A pkg_for=(
  [nbd-client]=nbd-client [nbdinfo]=libnbd-bin [nbdcopy]=libnbd-bin [nbdsh]=libnbd-bin
  [nbdkit]=nbdkit [fio]=fio [qemu-img]=qemu-utils [qemu-io]=qemu-utils
  [mkfs.ext4]=e2fsprogs [mkfs.xfs]=xfsprogs [qemu-system-x86_64]=qemu-system-x86
  [busybox]=busybox-static [cpio]=cpio [depmod]=kmod [shellcheck]=shellcheck [openssl]=openssl
)
missing=()
for cmd in "${!pkg_for[@]}"; do
  if ! command -v "$cmd" >/dev/null 2>&1 && [ ! -x "/usr/sbin/$cmd" ] && [ ! -x "/sbin/$cmd" ]; then
    missing+=("${pkg_for[$cmd]}")
  fi
done
if ! /usr/bin/python3 -c 'import nbd' >/dev/null 2>&1; then missing+=(python3-libnbd); fi
if [ "${#missing[@]}" -gt 0 ]; then
  mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
  log "installing Debian packages: ${missing[*]}"
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo=sudo
  apt_install() { DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "$@" >/dev/null; }
  # QEMU's packages must come from one release: machines that ship qemu-utils
  # from backports cannot take the stable qemu-system-x86, whose
  # qemu-system-common that qemu-utils declares broken.
  qemu_from=""
  if [[ " ${missing[*]} " == *" qemu-system-x86 "* ]] \
    && [[ "$(dpkg-query -W -f='${Version}' qemu-utils 2>/dev/null || true)" == *bpo* ]]; then
    codename=$(sed -n 's/^VERSION_CODENAME=//p' /etc/os-release)
    qemu_from="$codename-backports"
    if ! grep -rqs -- "$qemu_from" /etc/apt/sources.list /etc/apt/sources.list.d/; then
      log "adding $qemu_from to the apt sources (qemu-utils comes from there)"
      printf 'Types: deb\nURIs: http://deb.debian.org/debian\nSuites: %s\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
        "$qemu_from" | $sudo tee /etc/apt/sources.list.d/s3blk-backports.sources >/dev/null
    fi
    mapfile -t missing < <(printf '%s\n' "${missing[@]}" | grep -vx qemu-system-x86)
  fi
  $sudo apt-get update -qq
  [ "${#missing[@]}" -eq 0 ] || apt_install "${missing[@]}"
  [ -z "$qemu_from" ] || apt_install -t "$qemu_from" qemu-system-x86
fi

# --- Python tools in a venv: the S3 server, the chart tests' tools, and a grpcio
# client (the CSI socket must answer it with its default options).
py_tools=('moto[server]>=5' 'helm-python-sdk>=0.2' 'kubernetes-validate>=1.30' 'pytest>=8' 'pyyaml' 'grpcio>=1.60')
if [ ! -x .venv/bin/moto_server ] || ! .venv/bin/python -c 'import helm_python, kubernetes_validate, pytest, yaml, grpc' 2>/dev/null; then
  log "installing Python tools into .venv: ${py_tools[*]}"
  [ -x .venv/bin/python ] || python3 -m venv .venv
  .venv/bin/pip install -q --disable-pip-version-check "${py_tools[@]}"
fi

if ! command -v cargo-nextest >/dev/null 2>&1; then
  log "installing cargo-nextest"
  cargo install --locked cargo-nextest
fi

# --- One S3 server for the whole run, on a free loopback port.
mkdir -p target
port=$(.venv/bin/python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
.venv/bin/moto_server -H 127.0.0.1 -p "$port" >target/moto.log 2>&1 &
moto_pid=$!
trap 'kill "$moto_pid" 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do
  if .venv/bin/python -c "import socket; socket.create_connection(('127.0.0.1', $port), 1)" 2>/dev/null; then break; fi
  sleep 0.2
done
export S3BLK_TEST_S3_ENDPOINT="http://127.0.0.1:$port"
log "moto S3 server on $S3BLK_TEST_S3_ENDPOINT"

log "running the Rust test suite"
cargo nextest run --profile ci --all-targets "$@"

log "running the chart, deploy and script tests"
.venv/bin/python -m pytest -q tests/chart
