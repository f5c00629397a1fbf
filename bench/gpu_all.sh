#!/usr/bin/env bash
# Everything only a GPU can show, in one run (../shared/GPU.md):
#   bench/gpu_all.sh OUT_DIR [tests] [kernels] [engine]     (no stage names: all three)
# 1. nvidia-smi and versions; 2. the GPU-marked tests; 3. bench/kernel_bench.py;
# 4. bench/engine.py on random-weight models of real layer shapes (fp16, int4 AWQ, fp8);
# 5. every table under OUT_DIR, and a short summary printed last.
# Needs torch, triton, transformers, safetensors, pyyaml, psutil, pytest, hypothesis; no
# network. paho-mqtt and bitsandbytes come as wheels in .whl/ (scripts/gpu_wheels.sh), if there.
set -uo pipefail
out=${1:?usage: bench/gpu_all.sh OUT_DIR [tests] [kernels] [engine]}
shift
stages=${*:-tests kernels engine}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
summary=()
# wheels carried from the dev machine (scripts/gpu_wheels.sh): paho-mqtt, bitsandbytes
if compgen -G ".whl/*.whl" >/dev/null; then
  $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

{
  nvidia-smi
  $py -c "import torch, triton, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| triton', triton.__version__, '| transformers', transformers.__version__); print(torch.cuda.get_device_name(0), 'capability', torch.cuda.get_device_capability(0))"
  git rev-parse HEAD 2>/dev/null || true
} 2>&1 | tee "$out/versions.txt"

if [[ $stages == *tests* ]]; then
  $py -m pytest -m gpu -q -p no:cacheprovider tests/ 2>&1 | tee "$out/gpu_tests.txt"
  summary+=("gpu tests: $(tail -n 1 "$out/gpu_tests.txt")")
fi

if [[ $stages == *kernels* ]]; then
  $py bench/kernel_bench.py --out "$out" 2>&1 | tee "$out/kernels.txt"
  summary+=("kernels: $(grep -c '^| [0-9]' "$out/kernels.txt") rows, $(grep -c failed "$out/kernels.txt") failed")
fi

if [[ $stages == *engine* ]]; then
  common=(--device cuda --dtype float16 --concurrency 1,8,32 --max_tokens 64 --repeats 3 --skip_naive --skip_multi_turn)
  for shape in "llama2-7b 4" "qwen2.5-32b 2"; do
    set -- $shape
    for quant in none awq fp8; do
      args=("${common[@]}" --shape "$1" --layers "$2")
      [[ $quant != none ]] && args+=(--quantization "$quant")
      log="$out/engine_${1}_${quant}.txt"
      $py bench/engine.py "${args[@]}" 2>&1 | grep -v '^Loading\|^Writing\|it/s\]' | tee "$log"
      summary+=("engine $1 ($2 layers) $quant: $(grep -A5 'decode tok/s' "$log" | grep '^| 1 |' | head -n 1)")
    done
  done
fi

echo
echo "== summary =="
printf '%s\n' "${summary[@]}"
