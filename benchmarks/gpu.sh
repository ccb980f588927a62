#!/usr/bin/env bash
# The step-overhead benchmark on a CUDA GPU with bf16 autocast: all four models, all variants.
#
#   benchmarks/gpu.sh                      # full run (21 interleaved rounds; compiles every variant)
#   benchmarks/gpu.sh --quick              # smoke run
#   benchmarks/gpu.sh --models mlp gpt     # any other step_overhead.py option is passed through
#
# Writes the Markdown tables (times, ratios, first-call compile times, targets met / missed) to
# benchmarks/results/gpu_<UTC date and time>.md and prints them. Wall clock, CUDA synchronized
# before every clock read; inductor's caches are disabled for the first-call times. Fails with a
# message and exit status 1 when torch sees no CUDA device.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
python="${PYTHON:-python}"

if ! "$python" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "benchmarks/gpu.sh: no CUDA device: torch.cuda.is_available() is False" \
         "($("$python" -c 'import torch; print("torch", torch.__version__, "built with CUDA", torch.version.cuda)' 2>&1))." \
         "Run it on a machine with an NVIDIA GPU and a CUDA build of torch." >&2
    exit 1
fi

mkdir -p benchmarks/results
out="benchmarks/results/gpu_$(date -u +%Y%m%d_%H%M).md"
"$python" benchmarks/step_overhead.py --device cuda --autocast bf16 --clock wall --markdown "$out" "$@"
echo "wrote $out"
