#!/usr/bin/env bash
# Set up (once) and run the demo: the agent on a tiny model, one request per project.
#   ./run_demo.sh [--help for the demo's options]
set -euo pipefail
cd "$(dirname "$0")"
source scripts/setup.sh
setup_all
exec .venv/bin/python -m agent.demo "$@"
