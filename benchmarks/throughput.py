"""scalevec's baseline against a plain PyTorch Llama (``reference.py``): training tokens/s and MFU, one process.

    python benchmarks/throughput.py                            # tiny; fp32 eager, bf16 eager, bf16 compiled
    python benchmarks/throughput.py --shapes tiny small 0.12b-d2 --paths fp32-eager bf16-compile

Every (model, path) candidate runs in interleaved rounds; speeds are medians of per-round ratios to the
reference in fp32 eager (the yardstick of the issue). MFU is achieved training FLOP/s (``flops_per_token``)
over the bf16 matmul peak measured in the same run (best n×n×n product; before and after the rounds).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch._dynamo
from harness import SHAPES, Step, batch, build, flops_per_token, interleaved, matmul_peak, median, ratio
from reference import Llama, optimizer

from scalevec.config import TrainConfig
from scalevec.train.compiling import COMPILE_AUTO_MIN_STEPS, use_compile

PATHS = {"fp32-eager": ("fp32", False), "bf16-eager": ("bf16", False), "fp32-compile": ("fp32", True),
         "bf16-compile": ("bf16", True)}


def default_path() -> str:
    """The path a default run takes on this machine: ``train.compile=auto`` compiles runs of at least
    COMPILE_AUTO_MIN_STEPS steps when inductor can build CPU kernels (shorter runs stay eager)."""
    t = TrainConfig()
    compiled = use_compile(t.compile, COMPILE_AUTO_MIN_STEPS, torch.device("cpu"))
    return f"{t.precision}-{'compile' if compiled else 'eager'}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=["tiny"], choices=[k for k in SHAPES if not k.startswith("moe")])
    p.add_argument("--paths", nargs="+", default=["fp32-eager", "bf16-eager", "bf16-compile"], choices=list(PATHS))
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--json")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch._dynamo.config.recompile_limit = 64  # several models of one class compile in this process
    paths = list(dict.fromkeys(["fp32-eager", *args.paths]))  # the yardstick always runs
    peak0 = matmul_peak(torch.bfloat16), matmul_peak(torch.float32)
    print(f"threads={torch.get_num_threads()} torch={torch.__version__}; default training path (runs of >= {COMPILE_AUTO_MIN_STEPS} steps): {default_path()}; "
          f"{args.rounds} rounds x {args.steps} steps")
    rows = []
    for name in args.shapes:
        shape = SHAPES[name]
        x, y = batch(shape)
        mc = shape.model_config()
        cands, first = {}, {}
        for path in paths:
            precision, compile = PATHS[path]
            torch.manual_seed(0)
            ref = Llama(mc)
            # The reference as plain PyTorch compiles it; scalevec as its trainer does (train/compiling.py).
            plain = Step(ref, x, y, precision, compile, optimizer=optimizer(ref), compiler=torch.compile)
            for key, step in ((f"reference {path}", plain),
                              (f"scalevec {path}", Step(build(shape, "baseline"), x, y, precision, compile))):
                t0 = time.perf_counter()
                step()
                first[key] = time.perf_counter() - t0
                cands[key] = step
        times = interleaved(cands, args.rounds, args.steps)
        fpt = flops_per_token(mc, shape.seq)
        row = {"shape": name, "tokens_per_step": shape.tokens, "flops_per_token": fpt,
               "tok_per_s": {k: shape.tokens / median(v) for k, v in times.items()},
               "speedup_vs_reference_fp32_eager": {k: 1 / ratio(times, k, "reference fp32-eager") for k in times},
               "scalevec_vs_reference_same_path": {p_: 1 / ratio(times, f"scalevec {p_}", f"reference {p_}")
                                                   for p_ in paths},
               "first_step_s": first}
        rows.append(row)
        torch._dynamo.reset()
    peak1 = matmul_peak(torch.bfloat16), matmul_peak(torch.float32)
    peak = {"bf16": max(peak0[0], peak1[0]), "fp32": max(peak0[1], peak1[1])}
    print(f"measured matmul peak: bf16 {peak['bf16'] / 1e9:.0f} GFLOP/s, fp32 {peak['fp32'] / 1e9:.0f} GFLOP/s "
          f"(2048^3, best of 10, before {peak0[0] / 1e9:.0f}/{peak0[1] / 1e9:.0f} and after "
          f"{peak1[0] / 1e9:.0f}/{peak1[1] / 1e9:.0f})")
    for row in rows:
        fpt = row["flops_per_token"]["total"]
        row["mfu_vs_bf16_peak"] = {k: v * fpt / peak["bf16"] for k, v in row["tok_per_s"].items()}
        print(f"\n{row['shape']}: {row['tokens_per_step']} tokens/step, {fpt / 1e6:.1f} MFLOP/token (training)")
        print(f"  {'candidate':<26} {'tok/s':>9} {'vs ref fp32 eager':>18} {'MFU (bf16 peak)':>16} {'first step':>11}")
        for k in row["tok_per_s"]:
            print(f"  {k:<26} {row['tok_per_s'][k]:>9,.0f} {row['speedup_vs_reference_fp32_eager'][k]:>17.2f}x "
                  f"{100 * row['mfu_vs_bf16_peak'][k]:>15.1f}% {row['first_step_s'][k]:>10.1f}s")
        same = ", ".join(f"{k} {v:.2f}x" for k, v in row["scalevec_vs_reference_same_path"].items())
        print(f"  scalevec baseline / reference on the same path: {same}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"peak_flops": peak, "rows": rows, "default_path": default_path()}, f, indent=1)


if __name__ == "__main__":
    main()
