"""Where a strategy's extra step time goes: forward, backward, gradient clipping and the optimizer step, timed
separately for the baseline and each candidate (interleaved rounds, medians; one process).

    python benchmarks/decisions/step_parts.py                                   # tiny: baseline, unified and its parts
    python benchmarks/decisions/step_parts.py --shape small --strategies baseline unified dnp

The parts are those of ``harness.Step`` (the trainer's step) with a clock read between them; on CPU every op
is synchronous, so the split is exact up to timer resolution.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import _path  # noqa: F401 - the core harness lives one folder up
import torch
import torch._dynamo
from harness import SHAPES, Step, batch, interleaved_calls, warm_steps

PARTS = ("forward", "backward", "clip", "optimizer")


def timed_parts(step: Step) -> list[float]:
    t0 = time.perf_counter()
    loss = step.forward()
    t1 = time.perf_counter()
    loss.backward()
    t2 = time.perf_counter()
    params = [p for p in step.trainable if p.grad is not None]
    norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    torch.nn.utils.clip_grads_with_norm_(params, 1.0, norm)
    t3 = time.perf_counter()
    step.optimizer.step()
    step.optimizer.zero_grad(set_to_none=True)
    t4 = time.perf_counter()
    return [t1 - t0, t2 - t1, t3 - t2, t4 - t3]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="tiny", choices=list(SHAPES))
    p.add_argument("--strategies", nargs="+", default=["baseline", "unified", "hg", "dnp", "or", "iwd"])
    p.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--rounds", type=int, default=21)
    p.add_argument("--json", help="also write the results to this file")
    args = p.parse_args()
    torch._dynamo.config.recompile_limit = 64
    shape = SHAPES[args.shape]
    x, y = batch(shape)
    steps = warm_steps(shape, args.strategies, x, y, args.precision, args.compile)
    res = interleaved_calls(steps, args.rounds, timed_parts)
    print(f"{args.shape}: precision={args.precision} compile={args.compile} threads={torch.get_num_threads()} "
          f"torch={torch.__version__}; medians over {args.rounds} interleaved rounds, ms")
    print(f"  {'strategy':<10} " + " ".join(f"{k:>9}" for k in PARTS) + "      step  vs baseline  tensors")
    rows = {}
    base = None
    for s, v in res.items():
        med = [1e3 * statistics.median(c[i] for c in v) for i in range(len(PARTS))]
        total = 1e3 * statistics.median(sum(c) for c in v)
        base = base if base is not None else total
        n = sum(1 for _ in steps[s].model.parameters())
        rows[s] = {"ms": dict(zip(PARTS, med)), "step_ms": total, "tensors": n}
        print(f"  {s:<10} " + " ".join(f"{m:9.1f}" for m in med) + f"  {total:8.1f}  {total / base:10.3f}  {n:7d}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"shape": args.shape, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
