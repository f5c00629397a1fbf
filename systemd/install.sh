#!/usr/bin/env bash
# Installs the vLLM Deploy agent as the systemd service vllm-deploy (run as root; idempotent).
#
#   sudo systemd/install.sh [--prefix DIR] [--no-start] [--no-venv]
#   systemd/install.sh --root DIR [--prefix DIR] [--no-venv]     files only, under DIR
#   sudo systemd/install.sh --limits      only step 5b, then daemon-reload and try-restart
#
# 1. the system user and group vllm-deploy (also in the groups video and render where
#    they exist, for GPU device nodes that need them);
# 2. the code in --prefix (default /opt/vllm-deploy), owned by root, read-only for the service;
# 3. its venv, PREFIX/.venv, built by scripts/setup.sh (pip needs the network; --no-venv skips);
# 4. /etc/vllm-deploy/vllm-deploy.env from the example, only if there is none: an existing
#    one is never overwritten (the example is refreshed beside it as vllm-deploy.env.example);
# 5. /etc/systemd/system/vllm-deploy.service with PREFIX written into its paths;
# 5b. its drop-in vllm-deploy.service.d/50-limits.conf with MemoryMax= and TasksMax= from
#    UNIT_MEMORY_MAX and UNIT_TASKS_MAX in the env file (systemd expands no variables in
#    resource limits); without them the drop-in is removed and the unit's defaults apply;
# 6. systemctl daemon-reload and enable; and start (or restart, to load the new code), unless
#    --no-start or the env file was just created (edit it first, then start the service).
#
# --root DIR (or DESTDIR=DIR) installs the files under DIR instead of /, and creates no user,
# changes no owners and calls no systemctl: for packaging and for tests without systemd.
set -euo pipefail

SRC="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NAME=vllm-deploy
PREFIX=/opt/vllm-deploy
ROOT="${DESTDIR:-}"
START=1
VENV=1
LIMITS_ONLY=0
# What the service needs at run time (no tests, no caches, no build outputs).
PAYLOAD=(vLLMDeploy.py agent engine deploy_kernels projects configs scripts systemd README.md docs
         requirements.txt requirements-dev.txt requirements-lock.txt pyproject.toml)

say() { echo "install: $*" >&2; }
die() { say "error: $*"; exit 1; }

usage() { sed -n '2,7p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

# env_value KEY FILE: KEY's value in an env file (the last assignment, as for systemd), blanks
# and one pair of quotes around it removed; empty when absent. The file is read, never run.
env_value() {
    local key="$1" file="$2" line value=""
    while IFS= read -r line || [ -n "$line" ]; do
        line="${line#"${line%%[![:space:]]*}"}"
        case "$line" in "$key="*) value="${line#"$key="}" ;; esac
    done < "$file"
    value="${value%"${value##*[![:space:]]}"}"
    case "$value" in
        \"*\"|\'*\') value="${value:1:${#value}-2}" ;;
    esac
    printf '%s' "$value"
}

# write_limits: step 5b, the drop-in with the env file's UNIT_MEMORY_MAX and UNIT_TASKS_MAX
write_limits() {
    local env="$ETC/$NAME.env" dir="$UNIT_DIR/$NAME.service.d" memory tasks
    memory="$(env_value UNIT_MEMORY_MAX "$env")"
    tasks="$(env_value UNIT_TASKS_MAX "$env")"
    [[ -z "$memory" || "$memory" =~ ^([0-9]+(\.[0-9]+)?[KMGTPE]?|[0-9]+(\.[0-9]+)?%|infinity)$ ]] \
        || die "UNIT_MEMORY_MAX=$memory in $env: give bytes with K, M, G or T (24G), a share of the RAM (90%) or infinity"
    [[ -z "$tasks" || "$tasks" =~ ^([0-9]+|[0-9]+(\.[0-9]+)?%|infinity)$ ]] \
        || die "UNIT_TASKS_MAX=$tasks in $env: give a number of tasks (4096), a share of the kernel's limit (10%) or infinity"
    if [ -z "$memory$tasks" ]; then
        rm -f "$dir/50-limits.conf"
        rmdir "$dir" 2>/dev/null || true
        say "no UNIT_MEMORY_MAX or UNIT_TASKS_MAX in $env: the unit's limits apply"
        return 0
    fi
    install -d -m 755 "$dir"
    {
        echo "# Written by install.sh from UNIT_MEMORY_MAX and UNIT_TASKS_MAX in /etc/$NAME/$NAME.env:"
        echo "# change them there, then run install.sh --limits (an edit here is overwritten)."
        echo "[Service]"
        if [ -n "$memory" ]; then echo "MemoryMax=$memory"; fi
        if [ -n "$tasks" ]; then echo "TasksMax=$tasks"; fi
    } > "$dir/50-limits.conf.tmp"
    chmod 644 "$dir/50-limits.conf.tmp"
    mv -f "$dir/50-limits.conf.tmp" "$dir/50-limits.conf"
    say "installed $dir/50-limits.conf:${memory:+ MemoryMax=$memory}${tasks:+ TasksMax=$tasks}"
}

while [ $# -gt 0 ]; do
    case "$1" in
        --root) [ $# -ge 2 ] || die "--root needs a folder"; ROOT="$2"; shift 2 ;;
        --root=*) ROOT="${1#*=}"; shift ;;
        --prefix) [ $# -ge 2 ] || die "--prefix needs a folder"; PREFIX="$2"; shift 2 ;;
        --prefix=*) PREFIX="${1#*=}"; shift ;;
        --no-start) START=0; shift ;;
        --no-venv) VENV=0; shift ;;
        --limits) LIMITS_ONLY=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown option $1" ;;
    esac
done

case "$PREFIX" in
    /*) ;;
    *) die "--prefix must be an absolute path, got $PREFIX" ;;
esac
case "$PREFIX" in
    *[[:space:]#]*) die "--prefix must not contain spaces or '#', got $PREFIX" ;;
esac
PREFIX="${PREFIX%/}"
if [ -n "$ROOT" ]; then
    mkdir -p "$ROOT"
    ROOT="$(cd "$ROOT" && pwd)"
    [ "$ROOT" != / ] || ROOT=""
fi
LIVE=0  # a real installation: users, owners, systemctl
[ -n "$ROOT" ] || LIVE=1
if [ "$LIVE" = 1 ] && [ "$(id -u)" != 0 ]; then
    die "run as root (sudo $0), or give --root DIR to install the files under DIR"
fi

DEST="$ROOT$PREFIX"
ETC="$ROOT/etc/$NAME"
UNIT_DIR="$ROOT/etc/systemd/system"

# --limits: the drop-in alone, for a changed UNIT_MEMORY_MAX or UNIT_TASKS_MAX
if [ "$LIMITS_ONLY" = 1 ]; then
    [ -e "$ETC/$NAME.env" ] || die "no $ETC/$NAME.env: install first"
    write_limits
    if [ "$LIVE" = 1 ]; then
        systemctl daemon-reload
        systemctl try-restart "$NAME.service"
        say "limits applied (restarted if it was running): systemctl show -p MemoryMax -p TasksMax $NAME"
    fi
    exit 0
fi

# own USER:GROUP PATH...: only in a real installation (the user does not exist elsewhere)
own() {
    local who="$1"; shift
    [ "$LIVE" = 1 ] && chown "$who" "$@"
    return 0
}

# 1. the user
if [ "$LIVE" = 1 ]; then
    if ! id -u "$NAME" >/dev/null 2>&1; then
        say "creating the system user $NAME"
        nologin="$(command -v nologin || echo /usr/sbin/nologin)"
        useradd --system --user-group --home-dir "/var/lib/$NAME" --no-create-home \
            --shell "$nologin" --comment "vLLM Deploy agent" "$NAME"
    fi
    for group in video render; do
        if getent group "$group" >/dev/null && ! id -nG "$NAME" | tr ' ' '\n' | grep -qx "$group"; then
            usermod -aG "$group" "$NAME"
        fi
    done
fi

# 2. the code (skipped when this script already runs from the install folder)
if [ "$SRC" != "$DEST" ]; then
    say "copying the code to $DEST"
    install -d -m 755 "$DEST"
    for item in "${PAYLOAD[@]}"; do
        [ -e "$SRC/$item" ] || continue
        rm -rf "${DEST:?}/$item"
        cp -R "$SRC/$item" "$DEST/$item"
    done
    find "$DEST" -name __pycache__ -type d -prune -exec rm -rf {} +
    own root:root -R "$DEST"
    chmod -R u+rwX,go+rX,go-w "$DEST"
fi

# 3. the venv (root-owned: the service cannot change its own code)
if [ "$VENV" = 1 ]; then
    say "building $DEST/.venv (scripts/setup.sh)"
    # shellcheck source=../scripts/setup.sh
    source "$DEST/scripts/setup.sh"
    ensure_python_venv && ensure_venv || die "building the venv failed (see above)"
fi

# 4. the settings: never overwrite an operator's file
install -d -m 750 "$ETC"
own "root:$NAME" "$ETC"
install -m 644 "$SRC/systemd/$NAME.env.example" "$ETC/$NAME.env.example"
FRESH_ENV=0
if [ ! -e "$ETC/$NAME.env" ]; then
    install -m 640 "$SRC/systemd/$NAME.env.example" "$ETC/$NAME.env"
    own "root:$NAME" "$ETC/$NAME.env"
    FRESH_ENV=1
    say "created $ETC/$NAME.env: set the model, projects and broker there"
else
    say "kept the existing $ETC/$NAME.env"
fi

# 5. the unit, with the install folder in its paths
install -d -m 755 "$UNIT_DIR"
sed "s#/opt/vllm-deploy#$PREFIX#g" "$SRC/systemd/$NAME.service" > "$UNIT_DIR/$NAME.service.tmp"
chmod 644 "$UNIT_DIR/$NAME.service.tmp"
mv -f "$UNIT_DIR/$NAME.service.tmp" "$UNIT_DIR/$NAME.service"
say "installed $UNIT_DIR/$NAME.service"
write_limits

# 6. systemd
if [ "$LIVE" = 0 ]; then
    say "files installed under $ROOT; not calling systemctl (--root)"
    exit 0
fi
systemctl daemon-reload
systemctl enable "$NAME.service"
if [ "$START" = 0 ]; then
    say "enabled, not started (--no-start): systemctl start $NAME"
elif [ "$FRESH_ENV" = 1 ]; then
    say "enabled, not started: edit $ETC/$NAME.env, then: systemctl start $NAME"
else
    systemctl restart "$NAME.service"
    say "started: systemctl status $NAME; journalctl -u $NAME -f"
fi
