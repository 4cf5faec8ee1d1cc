#!/usr/bin/env bash
# The checks that need a GPU, in one go: the CUDA-marked tests, then a short engine benchmark on CUDA.
# Without a CUDA device it says so in one line and exits 0, so CI on CPU machines can always call it.
#   scripts/gpu_check.sh            # tests + tiny-model and SmolLM2 benchmarks (a few minutes)
#   GPU_CHECK_QUICK=1 scripts/gpu_check.sh   # tests + the tiny-model benchmark only
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${OPENLORA_VENV:-.venv}/bin

if ! "$bin/python" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "no GPU: torch.cuda.is_available() is False here; CUDA tests and the GPU benchmark were skipped"
    exit 0
fi

"$bin/python" - <<'PY'
import torch

props = torch.cuda.get_device_properties(0)
print(f"==> GPU: {props.name}, {props.total_memory / 2**30:.0f} GiB, torch {torch.__version__}, CUDA {torch.version.cuda}")
try:
    import flash_attn  # noqa: F401
    print("==> flash-attn imports")
except ImportError:
    print("==> flash-attn is not installed: the torch attention backend runs on CUDA")
PY

echo "==> CUDA tests"
"$bin/pytest" -m cuda -q -p no:cacheprovider tests

echo "==> engine benchmark on CUDA (tiny model)"
"$bin/python" bench/engine_bench.py --model tiny --device cuda --dtype bfloat16 --n 128 --rate inf \
    --input-len 8,256 --output-len 8,128 --batch-size 32

if [[ -z "${GPU_CHECK_QUICK:-}" ]]; then
    echo "==> engine benchmark on CUDA (SmolLM2-135M)"
    "$bin/python" bench/engine_bench.py --model smollm2 --device cuda --dtype bfloat16 --n 128 --rate inf \
        --batch-size 32
fi
