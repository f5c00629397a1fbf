#!/usr/bin/env bash
# The packages the GPU run needs that the lent GPU machine lacks (it has torch, triton,
# transformers, hypothesis, pytest...; no network), as wheels in .whl/ for the device tool's
# `carry` (device README): paho-mqtt (the tests' conftest and the agent import it) and
# bitsandbytes (its GPU kernels are tested against ours). bench/gpu_all.sh installs them.
#   bash scripts/gpu_wheels.sh          # then run(carry=[".whl"], "bash bench/gpu_all.sh $OUT")
set -euo pipefail
cd "$(dirname "$0")/.."
exclude=$(git rev-parse --git-path info/exclude)  # .whl/ stays out of commits
mkdir -p "$(dirname "$exclude")"
grep -qxF /.whl/ "$exclude" 2>/dev/null || echo /.whl/ >> "$exclude"
rm -rf .whl && mkdir .whl
# the device's Python (3.12, x86-64 manylinux); pip matches each manylinux tag exactly
platforms=()
for tag in manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
    platforms+=(--platform "${tag}_x86_64")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${platforms[@]}" -d .whl \
    "$(grep -m1 '^paho-mqtt' requirements.txt)" "$(grep -m1 '^bitsandbytes' requirements.txt)"
ls -l .whl
du -sh .whl  # the device tool carries at most 64 MiB per call
