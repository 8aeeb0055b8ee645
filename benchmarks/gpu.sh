#!/usr/bin/env bash
# The GPU check (docs/performance.md, "GPU"): a preflight, then phases a-e, each its own process under its own
# timeout, each writing $OUT/gpu_<phase>.json as soon as it has something (and again as each part finishes).
#
#   bash benchmarks/gpu.sh            every phase
#   bash benchmarks/gpu.sh a b        a subset; on one warm machine: "a b", then "c d e" (each under 8 minutes)
#
#   a  correctness: CPU vs CUDA fp32, bf16 vs fp32, compiled vs eager, MoE grouped vs loop with empty experts,
#      the SDPA kernel chosen, `scalevec train` 40 steps vs resumed from 20
#   b  dense 0.12b, baseline vs unified: tokens/s, time and memory ratios, MFU, compile time, top kernels
#   c  moe-0.12b, the same        d  1b, eager at batch 2 x 2048        e  short multi-seed training comparison
#
# The GPU machine has no network: `make gpu-prep` (on CPU) prepares the corpus and tomli_w under .cache/gpu,
# which the run carries: run(command="bash benchmarks/gpu.sh a b", carry=[".cache/gpu"]).
# SCALEVEC_GPU_SMOKE=1 runs it all on CPU at tiny sizes (tests/test_gpu_script.py).
set -uo pipefail
cd "$(dirname "$0")/.."
export OUT="${OUT:-runs/gpu}"
export SCALEVEC_GPU_DATA="${SCALEVEC_GPU_DATA:-$PWD/.cache/gpu/data}"
export PYTHONPATH="$PWD/src:$PWD/benchmarks:$PWD/.cache/gpu/site${PYTHONPATH:+:$PYTHONPATH}"
export SCALEVEC_CPU_KERNELS=0  # CPU-only kernels: their build is not worth the GPU's clock
export PYTHONUNBUFFERED=1
# The Python: $PY, else the project's venv, else the image's python3 (or python).
if [ -z "${PY:-}" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python
    elif command -v python3 > /dev/null; then PY=python3
    else PY=python; fi
fi
# Seconds per phase: a and b fit one 8-minute call, c, d and e the other.
declare -A LIMIT=([a]=140 [b]=290 [c]=190 [d]=90 [e]=160)
phases=("$@")
[ ${#phases[@]} -gt 0 ] || phases=(a b c d e)
for p in "${phases[@]}"; do
    [ -n "${LIMIT[$p]:-}" ] || { echo "gpu.sh: unknown phase '$p' (phases: a b c d e)"; exit 2; }
done
mkdir -p "$OUT"
timeout 30 "$PY" benchmarks/gpu.py preflight
rc=$?
if [ $rc -ne 0 ]; then
    [ $rc -eq 124 ] && echo "gpu preflight: took over 30 s (a slow import or device start); nothing run"
    exit 2
fi
status=0
for p in "${phases[@]}"; do
    timeout --kill-after=10 "${LIMIT[$p]}" "$PY" benchmarks/gpu.py "$p" > >(tee "$OUT/gpu_$p.log") 2>&1
    rc=$?
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
        echo "gpu.sh: phase $p stopped at its ${LIMIT[$p]} s limit; $OUT/gpu_$p.json keeps the parts it finished"
    elif [ $rc -ne 0 ]; then
        echo "gpu.sh: phase $p exited $rc (last lines of $OUT/gpu_$p.log above)"
    fi
    [ $rc -eq 0 ] || status=1
done
exit $status
