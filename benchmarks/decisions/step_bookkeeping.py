"""The per-tensor part of a training step, outside forward and backward: collecting the parameters, the gradient
norm, the finiteness check, clipping, the optimizer step and ``zero_grad``, timed inside real compiled steps
(interleaved rounds, medians, µs; one process).

    python benchmarks/decisions/step_bookkeeping.py                      # tiny: baseline, unified, dnp

``walk`` is ``[p for p in model.parameters() if p.grad is not None]`` (what the trainer did every step before it
kept the list); ``list`` the same filter over the kept list, what it does now.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time

import _path  # noqa: F401 - the core harness lives one folder up
import torch
import torch._dynamo
from harness import SHAPES, Step, batch, interleaved_calls, warm_steps

PARTS = ("walk", "list", "norm", "isfinite", "clip", "optimizer", "zero_grad")


def timed(step: Step) -> list[float]:
    step.forward().backward()
    t = [time.perf_counter()]
    walked = [p for p in step.model.parameters() if p.grad is not None]  # timed only, for comparison
    t.append(time.perf_counter())
    params = [p for p in step.trainable if p.grad is not None]
    t.append(time.perf_counter())
    assert len(params) == len(walked)
    norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    t.append(time.perf_counter())
    if not bool(torch.isfinite(norm)):
        raise FloatingPointError("non-finite gradient norm")
    t.append(time.perf_counter())
    torch.nn.utils.clip_grads_with_norm_(params, 1.0, norm)
    t.append(time.perf_counter())
    step.optimizer.step()
    t.append(time.perf_counter())
    step.optimizer.zero_grad(set_to_none=True)
    t.append(time.perf_counter())
    return [b - a for a, b in itertools.pairwise(t)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="tiny", choices=list(SHAPES))
    p.add_argument("--strategies", nargs="+", default=["baseline", "unified", "dnp"])
    p.add_argument("--rounds", type=int, default=25)
    p.add_argument("--json", help="also write the results to this file")
    args = p.parse_args()
    torch._dynamo.config.recompile_limit = 64
    shape = SHAPES[args.shape]
    x, y = batch(shape)
    steps = warm_steps(shape, args.strategies, x, y)
    res = interleaved_calls(steps, args.rounds, timed)
    print(f"{args.shape}: bf16 + compile, threads={torch.get_num_threads()} torch={torch.__version__}; "
          f"medians over {args.rounds} interleaved rounds, µs")
    print(f"  {'strategy':<10}" + "".join(f"{k:>11}" for k in PARTS) + "    tensors")
    out = {}
    for s, rows in res.items():
        med = {k: 1e6 * statistics.median(col) for k, col in zip(PARTS, zip(*rows))}
        out[s] = {"us": med, "tensors": len(steps[s].trainable)}
        print(f"  {s:<10}" + "".join(f"{v:>11.0f}" for v in med.values()) + f"{len(steps[s].trainable):>11}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
