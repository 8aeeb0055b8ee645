"""Why MoE pads every expert's group of rows on CPU (``scalevec.models.dispatch.CPU_GROUP_ROWS``): training steps with
the groups padded to a multiple of 1, 4, 8, ... rows, interleaved in one process (compiled, bf16 autocast).

    python benchmarks/decisions/moe_group_rows.py                                    # moe-tiny
    python benchmarks/decisions/moe_group_rows.py --shapes moe-tiny moe-small moe-0.12b-d2 --rows 1 8 16 32

On CPU ``F.grouped_mm`` runs one oneDNN matmul per expert, and oneDNN builds a kernel for every shape it has not
seen (``ONEDNN_VERBOSE=2`` prints ``create:cache_miss``). While the model trains, the router moves and every
expert's row count changes every step. The ``frozen`` row is the unpadded model with a learning rate of 0: its
routing, so its shapes, repeat every step, which is what the padded models approach. Every model starts from
the same weights and sees the same batch, so all take the same trajectory up to rounding.
"""

from __future__ import annotations

import argparse
import json

import _path  # noqa: F401 - the core harness lives one folder up
import torch
import torch._dynamo
from harness import SHAPES, Step, batch, build, interleaved, median, ratio

from scalevec.config import OptimConfig
from scalevec.models.dispatch import CPU_GROUP_ROWS
from scalevec.models.moe import moe_layers
from scalevec.optim import build_optimizer
from scalevec.strategy import preset


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=["moe-tiny"], choices=[s for s in SHAPES if s.startswith("moe")])
    p.add_argument("--rows", nargs="+", type=int, default=[1, 4, 8, 16, 32, 64])
    p.add_argument("--strategy", default="baseline")
    p.add_argument("--rounds", type=int, default=21)
    p.add_argument("--steps", type=int, default=3, help="steps per candidate per round")
    p.add_argument("--json", help="also write the results to this file")
    args = p.parse_args()
    if any(r < 1 for r in args.rows):
        p.error("--rows: every value must be >= 1")
    torch._dynamo.config.recompile_limit = 64
    print(f"threads={torch.get_num_threads()} torch={torch.__version__}, strategy {args.strategy}, bf16 + compile; "
          f"{args.rounds} rounds x {args.steps} steps; default CPU_GROUP_ROWS = {CPU_GROUP_ROWS}")
    out = []
    for name in args.shapes:
        shape = SHAPES[name]
        x, y = batch(shape)
        steps = {}
        for key, rows, lr in [("frozen", 1, 0.0)] + [(f"rows={r}", r, None) for r in args.rows]:
            model = build(shape, args.strategy)
            for layer in moe_layers(model):
                layer.cpu_group_rows = rows
            optim = build_optimizer(model, OptimConfig() if lr is None else OptimConfig(lr=lr),
                                    preset(args.strategy).weight_decay)
            steps[key] = Step(model, x, y, "bf16", True, args.strategy, optim)
        times = interleaved(steps, args.rounds, args.steps)
        ref = f"rows={args.rows[0]}"
        print(f"{name} ({shape.tokens} tokens per step)")
        row = {"shape": name, "step_ms": {}, "vs_first": {}}
        for key in steps:
            row["step_ms"][key] = 1e3 * median(times[key])
            row["vs_first"][key] = ratio(times, key, ref)
            print(f"  {key:<8} {row['step_ms'][key]:8.1f} ms   {row['vs_first'][key]:.3f}x {ref}")
        out.append(row)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
