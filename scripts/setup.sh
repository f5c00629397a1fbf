# shellcheck shell=bash disable=SC2015
# Set-up shared by ./run_tests.sh and ./run_demo.sh (sourced, not run): on a fresh
# Debian machine it installs python3-venv and mosquitto where missing (apt-get, as
# root or with sudo), and creates .venv, or refreshes it only when the requirements
# changed (a stamp file holds their hash), so a second run starts at once.

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
STAMP="$VENV/.requirements-stamp"
PYTHON="${PYTHON:-python3}"
TORCH_PIN="torch==2.13.0"  # first, alone: on CPU machines pip takes the local CPU build
# AutoAWQ's packing utilities are the tests' oracle of the AWQ layout; without --no-deps it
# would pull in accelerate, datasets and more
AUTOAWQ_PIN="autoawq==0.2.9"

say() { echo "setup: $*" >&2; }

as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"
    elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then sudo "$@"
    else return 1
    fi
}

apt_install() {
    command -v apt-get >/dev/null 2>&1 || { say "please install: $* (no apt-get here)"; return 1; }
    say "installing $* with apt-get"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null 2>&1 \
        || { as_root apt-get update -qq >/dev/null 2>&1 \
             && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null; } \
        || { say "cannot install $* (needs root or password-less sudo); run: sudo apt-get install -y $*"
             return 1; }
}

ensure_python_venv() {
    command -v "$PYTHON" >/dev/null 2>&1 || apt_install python3 python3-venv || return 1
    "$PYTHON" -c 'import venv, ensurepip' 2>/dev/null || apt_install python3-venv || return 1
}

ensure_mosquitto() {
    command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || apt_install mosquitto
}

# The tests of the shared session store (--session_store redis://...) talk to a real Redis
# on 127.0.0.1:6379; only the test set-up needs it.
ensure_redis() {
    redis_up() { "$VENV/bin/python" -c 'import socket; socket.create_connection(("127.0.0.1", 6379), 1)' 2>/dev/null; }
    redis_up && return 0
    command -v redis-server >/dev/null 2>&1 || apt_install redis-server || return 1
    say "starting redis-server on 127.0.0.1:6379 (nothing kept on disk)"
    redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no >/dev/null \
        || { say "cannot start redis-server"; return 1; }
    for _ in 1 2 3 4 5 6 7 8 9 10; do redis_up && return 0; sleep 0.5; done
    say "redis-server did not come up on 127.0.0.1:6379"; return 1
}

requirements_hash() {
    { echo "$TORCH_PIN $AUTOAWQ_PIN"; "$PYTHON" -c 'import sys; print(sys.version)'
      cat "$ROOT/requirements.txt" "$ROOT/requirements-dev.txt"; } | sha256sum | cut -d' ' -f1
}

ensure_venv() {
    local want
    want="$(requirements_hash)"
    if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && "$VENV/bin/python" -c '' 2>/dev/null; then
        return 0
    fi
    if ! "$VENV/bin/python" -c '' 2>/dev/null; then
        say "creating $VENV"
        rm -rf "$VENV" && "$PYTHON" -m venv "$VENV" || { say "cannot create $VENV"; return 1; }
    fi
    say "installing the requirements into $VENV (again only when they change)"
    rm -f "$STAMP"
    "$VENV/bin/python" -m pip install -q "$TORCH_PIN" \
        && "$VENV/bin/python" -m pip install -q -r "$ROOT/requirements-dev.txt" \
        && "$VENV/bin/python" -m pip install -q --no-deps "$AUTOAWQ_PIN" \
        || { say "pip install failed (see above)"; return 1; }
    echo "$want" > "$STAMP"
}

setup_all() {
    ensure_python_venv && ensure_venv && ensure_mosquitto
}
