#!/usr/bin/env bash
# The prepared GPU check (docs/performance.md, "GPU"): the 0.12B preset with bf16 + torch.compile on one CUDA
# device: tokens/s and MFU, unified/baseline time and peak-memory ratios, a 300-step loss comparison on the
# prepared default data. About 5 minutes on an H100; stops itself at 7.5 minutes.
#
# The device machine has no network: prepare the data here first, into the repo's (git-ignored) .cache, and
# carry it along:
#     SCALEVEC_CACHE=$PWD/.cache/scalevec .venv/bin/python -m scalevec prepare
#     run(command="bash benchmarks/gpu.sh", carry=[".cache/scalevec"])
# Results: benchmarks/results/gpu.json (cited by docs/performance.md) and gpu.txt (this script's output).
set -euo pipefail
cd "$(dirname "$0")/.."
export SCALEVEC_CACHE="${SCALEVEC_CACHE:-$PWD/.cache/scalevec}"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export SCALEVEC_CPU_KERNELS=0  # CPU-only kernels: not worth their ~15 s build on the GPU's clock
# A Python whose torch sees the GPU: $PY, else the project's venv, else python3 on PATH.
PY="${PY:-}"
for cand in "$PY" .venv/bin/python python3; do
    if [ -n "$cand" ] && "$cand" -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
        PY="$cand"; break
    fi
    PY=""
done
[ -n "$PY" ] || { echo "gpu.sh: no Python with a CUDA-enabled torch found (set PY=...)" >&2; exit 2; }
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader || true
mkdir -p benchmarks/results "${OUT:-benchmarks/results}"
timeout 450 "$PY" benchmarks/gpu.py --out "${OUT:-benchmarks/results}/gpu.json" "$@" \
    2>&1 | tee "${OUT:-benchmarks/results}/gpu.txt"
