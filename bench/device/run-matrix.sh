#!/bin/bash
# The `[serve] workers` scaling matrix on a many-core machine without package registries
# (the device machine: 16 cores, Python 3.12, its own libc; nothing can be fetched there).
# From the repository root, with the folder bench/device/prepare.sh made here carried along:
#     bash bench/device/run-matrix.sh [DIR]          (DIR default bench/run/device-carry)
# It
#   1. unpacks DIR/debs/*.deb with `dpkg -x` into $PREFIX (not into /: the host's own
#      packages stay as they are) and puts a `clamd` on PATH that runs the carried binary
#      through the carried loader and libraries;
#   2. makes a venv ($VENV) and installs avgate from DIR/wheels (pip --no-index);
#   3. runs bench/run.py --only workers with the carried peer kit (its clamd and sink):
#      [serve] workers = $WORKERS (default 1,2,4,8,16) at C=$CONC (default 64), SMTP -> sink
#      and ICAP, $RUNS run(s) of N=$N messages capped at $MAXS s, correctness counted;
#   4. renders the workers section (report.py --no-charts) and copies the session to $OUT.
# Budget: 1-2 min set-up (pip) + 10 runs of at most 20 s (+ corpus, 5 avgate starts): about
# 6 minutes with the defaults; after BUDGET s (default 420) bench/run.py gets SIGINT: it
# stops what it started and keeps the runs already recorded. Give the device call 600 s.
# SETUP_ONLY=1 stops after step 2 (a check of the carried files).
# Everything started is stopped by PID (bench/run.py does that for clamd, sink and avgate).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
DIR="$(cd "${1:-$ROOT/bench/run/device-carry}" && pwd)"
OUT="${OUT:-/tmp/avgate-device-out}"
PREFIX="${PREFIX:-/tmp/avgate-debs}"
VENV="${VENV:-/tmp/avgate-venv}"
PY="${PYTHON:-python3}"
WORKERS="${WORKERS:-1,2,4,8,16}"
CONC="${CONC:-64}"
N="${N:-4000}"; MAXS="${MAXS:-20}"; RUNS="${RUNS:-1}"
T0=$(date +%s)
log() { echo "[run-matrix +$(( $(date +%s) - T0 ))s] $*"; }
mkdir -p "$OUT"
{ date -u; uname -a; grep PRETTY /etc/os-release || true; echo "nproc: $(nproc)"; free -g || true
  "$PY" -V; ldd --version 2>&1 | head -1; } > "$OUT/sysinfo.txt" 2>&1
ulimit -n 65536 2>/dev/null || ulimit -n 8192 2>/dev/null || true

# 1. Debian packages, unpacked beside the system
log "unpacking $(ls "$DIR"/debs/*.deb | wc -l) .deb files into $PREFIX"
rm -rf "$PREFIX"; mkdir -p "$PREFIX/bin"
for deb in "$DIR"/debs/*.deb; do dpkg -x "$deb" "$PREFIX" 2>/dev/null || {
  "$PY" - "$deb" "$PREFIX" <<'PY'   # no dpkg on the host: ar + tar by hand
import io, sys, tarfile
data = open(sys.argv[1], "rb").read()
pos = 8
while pos < len(data):
    name, size = data[pos:pos + 16].strip().decode(), int(data[pos + 48:pos + 58])
    body = data[pos + 60:pos + 60 + size]
    if name.startswith("data.tar"):
        tarfile.open(fileobj=io.BytesIO(body)).extractall(sys.argv[2])
    pos += 60 + size + (size & 1)
PY
}; done
LIBS="$PREFIX/lib/x86_64-linux-gnu:$PREFIX/usr/lib/x86_64-linux-gnu"
LOADER=""  # the carried libc6's loader (its /lib64 link is absolute: not that one)
for f in "$PREFIX"/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2 \
         "$PREFIX"/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2; do
  if [ -f "$f" ] && [ ! -L "$f" ]; then LOADER="$f"; break; fi
done
[ -n "$LOADER" ] || { log "no ld-linux-x86-64.so.2 in the carried libc6"; exit 3; }
printf '#!/bin/sh\nexec %s --inhibit-cache --library-path %s %s/usr/sbin/clamd "$@"\n' \
  "$LOADER" "$LIBS" "$PREFIX" > "$PREFIX/bin/clamd"
chmod +x "$PREFIX/bin/clamd"
export PATH="$PREFIX/bin:$PATH"
clamd --version || { log "the carried clamd does not run"; exit 3; }

# 2. avgate from the wheelhouse
log "venv $VENV from $(ls "$DIR"/wheels/*.whl | wc -l) wheels"
rm -rf "$VENV"
if "$PY" -m venv "$VENV" 2>/dev/null && [ -x "$VENV/bin/pip" ]; then
  "$VENV/bin/pip" install -q --no-compile --no-index --find-links "$DIR/wheels" "$(ls "$DIR"/wheels/avgate-*.whl)"
else  # a Python without ensurepip: an empty venv, filled by the host's pip
  rm -rf "$VENV"; "$PY" -m venv --without-pip "$VENV"
  "$PY" -m pip --python "$VENV/bin/python" install -q --no-compile --no-index --find-links "$DIR/wheels" \
    "$(ls "$DIR"/wheels/avgate-*.whl)"
fi
"$VENV/bin/avgate" --help >/dev/null || { log "avgate does not run"; exit 4; }
[ "${SETUP_ONLY:-0}" = 1 ] && { log "SETUP_ONLY=1: clamd and avgate run; no matrix"; exit 0; }

# 3. the matrix (bench/run.py stops clamd, the sink and every avgate it started)
log "matrix: workers $WORKERS at C=$CONC, N=$N, ${MAXS}s cap, $RUNS run(s)"
export AVGATE_PEERS_DIR="$DIR/peers" PYTHONUNBUFFERED=1
cd "$ROOT"
timeout -s INT -k 30 "${BUDGET:-420}" "$VENV/bin/python" bench/run.py --only workers --no-install \
  --no-report --workers "$WORKERS" --workers-concurrency "$CONC" --concurrency "$CONC" \
  --runs "$RUNS" -n "$N" --max-seconds "$MAXS" 2>&1 | tee "$OUT/run.log" || true

# 4. results: the session folder (report.py renders it here with --extra-workers)
SESSION="$(ls -td bench/results/*/ | head -1)"
cp -r "$SESSION" "$OUT/session-$(basename "$SESSION")"
tar -C bench/run -czf "$OUT/logs.tar.gz" --exclude=device-carry --exclude=peers/clamd-db . || true
"$VENV/bin/python" bench/report.py "$SESSION" --out "$OUT/BENCHMARKS-device.md" --no-charts \
  --before none >/dev/null 2>&1 || true
log "done: $OUT (session $(basename "$SESSION"))"
