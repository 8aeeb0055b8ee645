"""Is ``torch.compile`` worth it for a run of N steps? Compile time (cold and warm cache) against the per-step
saving, for the trainer's bf16 path.

    python benchmarks/decisions/compile_warmup.py                       # tiny, baseline and unified, the demo's 400 steps
    python benchmarks/decisions/compile_warmup.py --shapes tiny small --steps 400

For each strategy, a fresh process with an empty inductor cache measures the first training step (compile)
and the first evaluation forward (the trainer's ``evaluate`` runs the compiled model under ``no_grad``, a second
graph); a second process with the now-filled cache gives the warm numbers. Steady-state step times, eager
against compiled, alternate in rounds in one process. Break-even = compile time / per-step saving.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import _path  # noqa: F401 - the core harness lives one folder up
import torch
from harness import SHAPES, Step, batch, build, interleaved, median, ratio


def first_steps(shape_name: str, strategy: str) -> dict[str, float]:
    """In this process: seconds of the first compiled training step and of the first compiled eval forward."""
    shape = SHAPES[shape_name]
    x, y = batch(shape)
    step = Step(build(shape, strategy), x, y, "bf16", True, strategy)
    t0 = time.perf_counter()
    step()
    train_s = time.perf_counter() - t0
    step.model.eval()
    t0 = time.perf_counter()
    with torch.no_grad():
        step.forward()
    eval_s = time.perf_counter() - t0
    return {"train_compile_s": train_s, "eval_compile_s": eval_s}


def in_subprocess(shape: str, strategy: str, cache: str, threads: int) -> dict[str, float]:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
    here = os.path.dirname(os.path.abspath(__file__))
    code = (f"import sys, json, torch; sys.path[:0] = [{here!r}, {os.path.dirname(here)!r}]; "
            f"torch.set_num_threads({threads}) if {threads} else None; "
            f"from compile_warmup import first_steps; print(json.dumps(first_steps({shape!r}, {strategy!r})))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=["tiny"], choices=list(SHAPES))
    p.add_argument("--strategies", nargs="+", default=["baseline", "unified"])
    p.add_argument("--steps", type=int, default=400, help="run length to judge (the demo runs 400)")
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--json")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch._dynamo.config.recompile_limit = 64
    print(f"threads={torch.get_num_threads()} torch={torch.__version__}")
    rows = []
    for name in args.shapes:
        shape = SHAPES[name]
        x, y = batch(shape)
        for strategy in args.strategies:
            with tempfile.TemporaryDirectory() as cache:
                cold = in_subprocess(name, strategy, cache, args.threads)
                warm = in_subprocess(name, strategy, cache, args.threads)
            cands = {mode: Step(build(shape, strategy), x, y, "bf16", mode == "compiled", strategy)
                     for mode in ("eager", "compiled")}
            times = interleaved(cands, args.rounds, 3)
            eager, compiled = median(times["eager"]), median(times["compiled"])
            saving = eager - compiled
            row = {"shape": name, "strategy": strategy, "cold": cold, "warm": warm, "eager_step_s": eager,
                   "compiled_step_s": compiled, "speedup": 1 / ratio(times, "compiled", "eager")}
            for kind in ("cold", "warm"):
                total = row[kind]["train_compile_s"] + row[kind]["eval_compile_s"]
                row[f"break_even_steps_{kind}"] = total / saving if saving > 0 else float("inf")
                row[f"run_saving_{kind}_s"] = args.steps * saving - total
            rows.append(row)
            print(f"{name:<9} {strategy:<9} step eager {1e3 * eager:.1f} ms, compiled {1e3 * compiled:.1f} ms "
                  f"({row['speedup']:.2f}x); compile cold {cold['train_compile_s']:.1f}+{cold['eval_compile_s']:.1f} s "
                  f"(train+eval), warm {warm['train_compile_s']:.1f}+{warm['eval_compile_s']:.1f} s; "
                  f"break-even {row['break_even_steps_cold']:.0f} steps cold, {row['break_even_steps_warm']:.0f} warm; "
                  f"{args.steps} steps: compile saves {row['run_saving_cold_s']:+.0f} s cold, "
                  f"{row['run_saving_warm_s']:+.0f} s warm", flush=True)
            torch._dynamo.reset()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
