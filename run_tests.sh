#!/usr/bin/env bash
# Set up (once) and run the test suite: ./run_tests.sh [pytest arguments]
set -euo pipefail
cd "$(dirname "$0")"
source scripts/setup.sh
setup_all && ensure_redis
status=0
.venv/bin/python -m pytest "$@" || status=$?
if [ "$status" -eq 5 ]; then
    echo "run_tests.sh: pytest ran no tests (exit code 5): that is a failure" >&2
    exit 1
fi
exit "$status"
