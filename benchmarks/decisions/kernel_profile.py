"""Which kernels a strategy adds to a compiled training step: torch.profiler self time per kernel, candidate
minus baseline, one process.

    python benchmarks/decisions/kernel_profile.py                                  # tiny: unified and dnp vs baseline
    python benchmarks/decisions/kernel_profile.py --shape small --strategies baseline unified

Inductor names a fused kernel after the ops inside it and prefixes a per-graph counter; the counter and the
trailing index are stripped so the same kernel lines up across models. Profiling adds overhead of its own, so
read the differences, not the totals, and prefer ``overhead.py`` for the ratio itself.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict

import _path  # noqa: F401 - the core harness lives one folder up
import torch
import torch._dynamo
import torch._inductor.config as inductor_config
from harness import SHAPES, batch, warm_steps
from torch.profiler import ProfilerActivity, profile


def kernel_name(key: str) -> str:
    if key.startswith("## Call CompiledFxGraph"):
        return "## Call CompiledFxGraph (wrapper)"
    return re.sub(r"_\d+$", "", re.sub(r"^graph_\d+_", "", key))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="tiny", choices=list(SHAPES))
    p.add_argument("--strategies", nargs="+", default=["baseline", "unified", "dnp"],
                   help="the first is the reference")
    p.add_argument("--rounds", type=int, default=3, help="profiled rounds; the strategies alternate")
    p.add_argument("--steps", type=int, default=5, help="steps per strategy per round")
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--json", help="also write the per-kernel table to this file")
    args = p.parse_args()
    inductor_config.cpp.enable_kernel_profile = True  # one profiler event per generated C++ kernel
    torch._dynamo.config.recompile_limit = 64
    shape = SHAPES[args.shape]
    x, y = batch(shape)
    steps = warm_steps(shape, args.strategies, x, y)
    n = args.rounds * args.steps
    us: dict[str, dict[str, float]] = {s: defaultdict(float) for s in steps}
    calls: dict[str, dict[str, float]] = {s: defaultdict(float) for s in steps}
    for r in range(args.rounds):
        for name in (list(steps) if r % 2 == 0 else list(steps)[::-1]):
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(args.steps):
                    steps[name]()
            for e in prof.key_averages():
                us[name][kernel_name(e.key)] += e.self_cpu_time_total / n
                calls[name][kernel_name(e.key)] += e.count / n
    ref = args.strategies[0]
    print(f"{args.shape}: bf16 + compile, threads={torch.get_num_threads()}, torch={torch.__version__}; "
          f"profiler self time per step (us), mean of {n} steps")
    out = {}
    for cand in args.strategies[1:]:
        keys = set(us[ref]) | set(us[cand])
        delta = {k: us[cand].get(k, 0.0) - us[ref].get(k, 0.0) for k in keys}
        total_ref, total_cand = sum(us[ref].values()), sum(us[cand].values())
        print(f"\n{cand} - {ref}: total {total_ref:,.0f} -> {total_cand:,.0f} us ({total_cand / total_ref:.3f}x)")
        print(f"  {'delta':>8} {ref:>9} {cand:>9}  calls  kernel")
        for k in sorted(keys, key=lambda k: -abs(delta[k]))[:args.top]:
            print(f"  {delta[k]:8.0f} {us[ref].get(k, 0):9.0f} {us[cand].get(k, 0):9.0f}  "
                  f"{calls[ref].get(k, 0):.0f}/{calls[cand].get(k, 0):.0f}  {k[:90]}")
        out[cand] = {"total_us": [total_ref, total_cand],
                     "kernels": {k: [us[ref].get(k, 0.0), us[cand].get(k, 0.0)] for k in keys}}
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"shape": args.shape, "reference": ref, "candidates": out}, f, indent=1)


if __name__ == "__main__":
    main()
