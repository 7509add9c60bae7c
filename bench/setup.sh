#!/usr/bin/env bash
# Installs what bench/run.py needs; safe to run again (does only what is missing or outdated).
#   - the project venv (.venv) with hubwire + its Redis extra, and the bench's Python packages:
#     python-socketio (the Python reference), picows (the floor), uvloop (load generator),
#     matplotlib (the report's PNG plots)
#   - redis-server (apt-get, when missing)
#   - Node socket.io + @socket.io/redis-adapter + redis: `npm ci` in bench/node (its own lock file)
# Nothing is installed globally besides redis-server/node from Debian's packages when absent.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
VENV=.venv

need_apt() {
  if ! command -v "$1" >/dev/null 2>&1; then
    echo "==> installing $2 (apt-get)"
    if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "$2" >/dev/null
  fi
}

if [ ! -x "$VENV/bin/python" ]; then
  echo "==> creating $VENV"
  "$PY" -m venv "$VENV"
fi

STAMP="$VENV/.bench-installed"
if [ ! -f "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ] || [ bench/setup.sh -nt "$STAMP" ] \
   || ! "$VENV/bin/python" -c "import hubwire, redis, starlette, socketio, picows, uvloop, matplotlib" 2>/dev/null; then
  echo "==> installing Python packages into $VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -e . "starlette>=0.37" \
    "python-socketio>=5.11" "picows>=1.6" "uvloop>=0.19" "hiredis>=2.0" \
    "matplotlib>=3.7"
  touch "$STAMP"
fi

need_apt redis-server redis-server
need_apt node nodejs
need_apt npm npm

if [ ! -d bench/node/node_modules ] || [ bench/node/package-lock.json -nt bench/node/node_modules/.package-lock.json ]; then
  echo "==> installing the Node reference server's packages (npm ci in bench/node)"
  (cd bench/node && npm ci --no-audit --no-fund --loglevel=error)
fi

echo "==> bench ready: .venv/bin/python bench/run.py --help"
