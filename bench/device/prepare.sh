#!/bin/bash
# Build, here (the project machine: Debian 12, package registries reachable), what
# bench/device/run-matrix.sh needs on a bare many-core machine without registries:
#   DIR/debs/    clamav-daemon and the Debian packages of every library /usr/sbin/clamd loads
#                (libc6 included: its loader runs clamd there, whatever that host's libc is)
#   DIR/wheels/  avgate's wheel and the wheels of its dependencies for the device's Python
#   DIR/peers/   a copy of the peer kit's scripts (start-clamd.sh, start-sink.sh, stop.sh,
#                loadgen.py, sink.py, common.sh): ../shared/peers does not travel
# Usage (from the repository root): bench/device/prepare.sh [DIR] [PYVER]
#   DIR    default bench/run/device-carry (bench/run/ is git-ignored: name it in `carry`)
#   PYVER  the device's python3 version, default 3.12
# Needs clamav-daemon installed here (the bench installs it) and pip.
set -euo pipefail
DIR="${1:-bench/run/device-carry}"
PYVER="${2:-3.12}"
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
PEERS="${AVGATE_PEERS_DIR:-$ROOT/../shared/peers}"
PIP="${PIP:-$ROOT/.venv/bin/pip}"
rm -rf "$DIR"; mkdir -p "$DIR/debs" "$DIR/wheels" "$DIR/peers"

# 1. .deb files: clamav-daemon + the package owning each library that `ldd clamd` lists
pkgs="clamav-daemon"
for lib in $(ldd /usr/sbin/clamd | awk '/=> \//{print $3} /ld-linux/{print $1}'); do
  p="$(readlink -f "$lib")"
  owner="$(dpkg -S "$p" 2>/dev/null || dpkg -S "${p#/usr}" 2>/dev/null || dpkg -S "/usr$p")"
  pkgs="$pkgs ${owner%%:*}"
done
pkgs="$(echo "$pkgs" | tr ' ' '\n' | sort -u | tr '\n' ' ')"
echo "prepare: debs: $pkgs"
(cd "$DIR/debs" && apt-get download $pkgs)

# 2. wheels: avgate itself (pure Python), then every dependency as a binary wheel for the
#    device's CPython (manylinux, x86-64); pip resolves the dependency tree for that target
"$PIP" wheel --no-deps -w "$DIR/wheels" "$ROOT"
"$PIP" download --only-binary=:all: --python-version "$PYVER" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d "$DIR/wheels" "$(ls "$DIR"/wheels/avgate-*.whl)"

# 3. the peer kit's scripts (read-only there; copied, not changed)
cp "$PEERS"/*.sh "$PEERS"/*.py "$DIR/peers/"
du -sh "$DIR" "$DIR"/*
echo "prepare: done; on the device: carry [\"$DIR\"] and run: bash bench/device/run-matrix.sh $DIR"
