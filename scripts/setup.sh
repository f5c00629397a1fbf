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

# What the venv is built from: the lock of exact versions (every package, transitive ones
# included), written by scripts/refresh_lock.sh from a venv in which the suite passed. Edit
# requirements*.txt to add a dependency, then refresh the lock: a package the requirements name
# and the lock does not pin stops the set-up with that fix.
LOCK_NAME=requirements-lock.txt

requirements_hash() {
    { echo "$TORCH_PIN $AUTOAWQ_PIN"; "$PYTHON" -c 'import sys; print(sys.version)'
      cat "$ROOT/requirements.txt" "$ROOT/requirements-dev.txt" "$ROOT/$LOCK_NAME"; } | sha256sum | cut -d' ' -f1
}

# The last line of a failed set-up: which step, and what to do about it.
setup_failed() {
    say "FAILED at step \"$1\": $2"
    return 1
}

# pip, quiet, its whole output kept in $VENV/setup.log and its last lines shown on failure.
pip_logged() {
    local log="$VENV/setup.log"
    if ! "$VENV/bin/python" -m pip install -q --progress-bar off "$@" >>"$log" 2>&1; then
        tail -n 15 "$log" | sed 's/^/    pip: /' >&2
        return 1
    fi
}

# Installs exactly the lock into $VENV (fresh or existing) and removes what it does not list.
install_locked() {
    local fix="check the network (pip needs PyPI), or run scripts/refresh_lock.sh if requirements*.txt changed"
    local unpinned
    unpinned="$(comm -23 <(requirement_names) <(lock_names < "$ROOT/$LOCK_NAME"))"
    [ -z "$unpinned" ] || { setup_failed "check the lock" \
        "requirements*.txt name $(echo "$unpinned" | tr "\n" " ")but requirements-lock.txt does not pin them: run scripts/refresh_lock.sh"
        return 1; }
    say "[2/4] torch (${TORCH_PIN#torch==}; on a CPU machine the local CPU build, on a GPU box the CUDA build, minutes)"
    pip_logged -c "$ROOT/$LOCK_NAME" "$TORCH_PIN" || { setup_failed "install torch" "$fix"; return 1; }
    say "[3/4] the locked packages of requirements-dev.txt ($(grep -c '==' "$ROOT/$LOCK_NAME") pins in requirements-lock.txt; a few minutes the first time)"
    pip_logged -c "$ROOT/$LOCK_NAME" -r "$ROOT/requirements-dev.txt" \
        && pip_logged -c "$ROOT/$LOCK_NAME" --no-deps "$AUTOAWQ_PIN" \
        || { setup_failed "install requirements-dev.txt from the lock" "$fix"; return 1; }
    say "[4/4] removing packages the lock does not list"
    local extra
    extra="$(comm -23 <("$VENV/bin/python" -m pip freeze | lock_names) <(lock_names < "$ROOT/$LOCK_NAME"))"
    # shellcheck disable=SC2086  # one package name a word
    [ -z "$extra" ] || "$VENV/bin/python" -m pip uninstall -q -y $extra >>"$VENV/setup.log" 2>&1 \
        || { setup_failed "remove packages outside the lock ($extra)" "delete .venv and run again"; return 1; }
}

# Package names of requirement lines ('name==version', 'name>=1; marker'), normalised as pip
# compares them, sorted; comments, options and '-r' lines are skipped.
lock_names() {
    grep -E '^[A-Za-z0-9]' | sed -E 's/[]<>!~; @=[].*//' | tr 'A-Z_.' 'a-z--' | sort -u
}

requirement_names() {
    cat "$ROOT/requirements.txt" "$ROOT/requirements-dev.txt" | lock_names
}

ensure_venv() {
    local want started=$SECONDS
    want="$(requirements_hash)"
    if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && "$VENV/bin/python" -c '' 2>/dev/null; then
        return 0
    fi
    if ! "$VENV/bin/python" -c '' 2>/dev/null; then
        say "[1/4] creating $VENV (the first run takes a few minutes; later runs start at once)"
        rm -rf "$VENV" && "$PYTHON" -m venv "$VENV" \
            || { setup_failed "create $VENV" "install python3-venv (sudo apt-get install -y python3-venv)"; return 1; }
    else
        say "[1/4] refreshing $VENV: the lock or the requirements changed"
    fi
    rm -f "$STAMP"
    install_locked || return 1
    echo "$want" > "$STAMP"
    say "$VENV is ready ($((SECONDS - started)) s); pip's log: $VENV/setup.log"
}

setup_all() {
    ensure_python_venv || { setup_failed "python3 with venv" "sudo apt-get install -y python3 python3-venv"; return 1; }
    ensure_venv || return 1
    ensure_mosquitto || { setup_failed "mosquitto" "sudo apt-get install -y mosquitto"; return 1; }
}
