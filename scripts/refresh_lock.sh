#!/usr/bin/env bash
# Tries the newest releases that requirements*.txt allow and, only when the whole test suite
# and the demo pass with them, rewrites requirements-lock.txt from that venv:
#
#   scripts/refresh_lock.sh          (10-15 minutes on two cores; needs PyPI)
#
# The venv is a throwaway one under /tmp: .venv is not touched. The next ./run_tests.sh or
# ./run_demo.sh sees the new lock and refreshes .venv to it. torch stays at the release the
# set-up pins (TORCH_PIN in scripts/setup.sh, == in requirements.txt).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=setup.sh
source scripts/setup.sh

TRY="$(mktemp -d "${TMPDIR:-/tmp}/vllm-deploy-newest.XXXXXX")"
trap 'rm -rf "$TRY"' EXIT
VENV="$TRY/venv"  # the set-up's functions work on $VENV
started=$SECONDS

ensure_python_venv || { setup_failed "python3 with venv" "sudo apt-get install -y python3 python3-venv"; exit 1; }
ensure_mosquitto || { setup_failed "mosquitto" "sudo apt-get install -y mosquitto"; exit 1; }
say "[1/4] the newest allowed releases into a throwaway venv, $VENV (minutes)"
"$PYTHON" -m venv "$VENV"
pip_logged "$TORCH_PIN" \
    && pip_logged -r requirements-dev.txt \
    && pip_logged --no-deps "$AUTOAWQ_PIN" \
    || { setup_failed "install the newest releases" "see pip's lines above; the lock is unchanged"; exit 1; }
ensure_redis || { setup_failed "redis" "start a Redis on 127.0.0.1:6379"; exit 1; }

say "[2/4] the candidate lock, requirements-lock.txt, from them (the old one is put back on failure)"
new="$TRY/requirements-lock.txt"
{
    echo "# Exact versions of every package the set-up installs (transitive ones included), written by"
    echo "# scripts/refresh_lock.sh on $(date -u +%F) ($("$VENV/bin/python" -c 'import platform; print("Python", platform.python_version(), platform.system(), platform.machine())'))"
    echo "# from a venv in which the whole test suite and the demo passed. Do not edit: add a"
    echo "# dependency to requirements.txt (runtime) or requirements-dev.txt (tests), then run"
    echo "# scripts/refresh_lock.sh. torch's local build label (+cpu) is left out: the same pin then"
    echo "# takes the CUDA build on a GPU box."
    "$VENV/bin/python" -m pip freeze | sed -E 's/^(torch==[^+]+)\+.*$/\1/' | LC_ALL=C sort -f
} > "$new"
if [ -f requirements-lock.txt ]; then
    cp requirements-lock.txt "$TRY/old-lock.txt"
    diff <(grep -v '^#' requirements-lock.txt) <(grep -v '^#' "$new") | sed -n 's/^[<>] /    &/p' >&2 \
        || true
fi
cp "$new" requirements-lock.txt
put_back() {
    if [ -f "$TRY/old-lock.txt" ]; then cp "$TRY/old-lock.txt" requirements-lock.txt
    else rm -f requirements-lock.txt; fi
}

say "[3/4] the whole test suite with them"
status=0
"$VENV/bin/python" -m pytest -q -p no:cacheprovider || status=$?
[ "$status" = 0 ] || { put_back; setup_failed "the test suite (pytest exit $status)" \
    "these releases break something: fix the code, or bound the range in requirements*.txt with a reason; the lock is unchanged"; exit 1; }

say "[4/4] the demo with them"
"$VENV/bin/python" -m agent.demo || { put_back; setup_failed "the demo" "see above; the lock is unchanged"; exit 1; }

say "requirements-lock.txt rewritten ($((SECONDS - started)) s); commit it"
