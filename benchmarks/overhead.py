"""Cost of a scale-vector strategy over the baseline: training-step time and memory ratios, one process.

    python benchmarks/overhead.py                                  # tiny, bf16 autocast + torch.compile
    python benchmarks/overhead.py --shapes tiny small 0.12b-d2 moe-tiny moe-small moe-0.12b-d2 --runs 1
    python benchmarks/overhead.py --no-compile --precision fp32    # any other path
    python benchmarks/overhead.py --set scale.weight_decay=none       # the candidate preset with overrides

Each measurement runs ``--runs`` times (default 5), each in a fresh process: on a shared host one process's ratio
moves by several percent more than its A/A row suggests, so the runs' rounds are pooled at the end (median of all
per-round ratios, bootstrap 95% interval, as ``pool_rounds.py`` does).

Time: baseline and candidate steps alternate in rounds (median of per-round ratios); ``--control`` adds a
second baseline model as an A/A row, the noise floor of the measurement. Memory: parameters + gradients +
AdamW moments, plus the bytes autograd saves for backward in one forward (unique storages, parameters
excluded) — a deterministic bound on the step's peak, see ``harness.training_memory``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch._dynamo
from harness import SHAPES, Step, batch, build, interleaved, median, ratio, training_memory
from pool_rounds import pooled_lines

from scalevec.config import load_config
from scalevec.typed_config import ConfigError


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=["tiny"], choices=list(SHAPES))
    p.add_argument("--strategy", default="unified", help="candidate strategy preset (vs baseline)")
    p.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--steps", type=int, default=3, help="steps per candidate per round")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--control", action="store_true", help="add an A/A row (a second baseline model)")
    p.add_argument("--set", nargs="+", default=[], metavar="scale.KEY=VALUE",
                   help="overrides of the candidate's strategy (an ablation of a preset)")
    p.add_argument("--runs", type=int, default=5, help="fresh processes whose rounds are pooled (1: this one)")
    p.add_argument("--json", help="also write the results (every run's rows) to this file")
    args = p.parse_args()
    for flag in ("runs", "rounds", "steps"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag}: must be >= 1")
    if bad := [o for o in args.set if not o.startswith("scale.") or "=" not in o]:
        p.error(f"--set: {bad[0]!r} is not a scale.KEY=VALUE override")
    try:
        candidate = load_config(None, [f"scale.strategy={args.strategy}", *args.set]).scale
    except ConfigError as e:
        p.error(str(e))
    # The candidate's name in every printed line and in the JSON rows: the preset, with its overrides if any.
    label = args.strategy + (f"[{','.join(o.removeprefix('scale.') for o in args.set)}]" if args.set else "")
    if args.runs > 1:
        pooled_runs(args)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    torch._dynamo.config.recompile_limit = 64  # several models of one class compile in this process
    print(f"path: precision={args.precision} compile={args.compile} threads={torch.get_num_threads()} "
          f"torch={torch.__version__}; {args.rounds} rounds x {args.steps} steps, medians of per-round ratios"
          + (f"; candidate {label}" if args.set else ""))
    rows = []
    for name in args.shapes:
        shape = SHAPES[name]
        x, y = batch(shape)
        names = ["baseline", candidate] + (["baseline"] if args.control else [])
        keys = ["baseline", label] + (["control"] if args.control else [])
        steps, warm = {}, {}
        for key, strategy in zip(keys, names):
            s = Step(build(shape, strategy), x, y, args.precision, args.compile, strategy)
            t0 = time.perf_counter()
            s()
            warm[key] = time.perf_counter() - t0  # first step: compile (if any) plus allocation
            steps[key] = s
        mem = {k: training_memory(s) for k, s in steps.items() if k != "control"}
        times = interleaved(steps, args.rounds, args.steps)
        b, c = mem["baseline"], mem[label]
        row = {
            "shape": name, "tokens": shape.tokens, "precision": args.precision, "compile": args.compile,
            "step_ms": {k: 1e3 * median(v) for k, v in times.items()},
            "round_ms": {k: [1e3 * t for t in v] for k, v in times.items()},  # every round, for spreads
            "first_step_s": warm,
            "time_ratio": ratio(times, label, "baseline"),
            "memory_ratio": c["total"] / b["total"],
            "activation_ratio": c["activations"] / b["activations"],
            "state_ratio": c["state"] / b["state"],
            "memory_mib": {k: {kk: vv / 2**20 for kk, vv in m.items()} for k, m in mem.items()},
        }
        if args.control:
            row["control_ratio"] = ratio(times, "control", "baseline")
        rows.append(row)
        _print(row, label)
        torch._dynamo.reset()
    _write_json(args.json, rows)


def pooled_runs(args: argparse.Namespace) -> None:
    """Run this script ``args.runs`` times in fresh processes, then pool their rounds per shape."""
    child = [sys.executable, __file__, "--shapes", *args.shapes, "--strategy", args.strategy, "--precision",
             args.precision, "--compile" if args.compile else "--no-compile", "--rounds", str(args.rounds),
             "--steps", str(args.steps), "--threads", str(args.threads), "--runs", "1",
             *(["--control"] if args.control else []), *(["--set", *args.set] if args.set else [])]
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.runs):
            print(f"run {i + 1}/{args.runs}", flush=True)
            out = Path(tmp) / f"run_{i}.json"
            rc = subprocess.run([*child, "--json", str(out)], check=False).returncode
            if rc != 0:  # the child printed its own error; the runs before it are kept if --json was given
                _write_json(args.json, rows)
                raise SystemExit(f"overhead.py: run {i + 1}/{args.runs} exited with status {rc}")
            rows += json.loads(out.read_text())
    print(f"pooled over {args.runs} runs:")
    for name in args.shapes:
        for line in pooled_lines([r for r in rows if r["shape"] == name], name):
            print(f"  {line}")
    _write_json(args.json, rows)


def _write_json(path: str | None, rows: list[dict]) -> None:
    if path and rows:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(rows, indent=1))


def _print(r: dict, strategy: str) -> None:
    ms = r["step_ms"]
    mb, mc = r["memory_mib"]["baseline"], r["memory_mib"][strategy]
    control = f"  A/A {r['control_ratio']:.3f}" if "control_ratio" in r else ""
    print(f"{r['shape']:<13} time {strategy}/baseline {r['time_ratio']:.3f}{control}  "
          f"(step {ms['baseline']:.1f} / {ms[strategy]:.1f} ms)  "
          f"memory {r['memory_ratio']:.3f} (total {mb['total']:.1f} / {mc['total']:.1f} MiB; "
          f"activations {r['activation_ratio']:.3f}, state {r['state_ratio']:.4f})  "
          f"first step {r['first_step_s']['baseline']:.1f} / {r['first_step_s'][strategy]:.1f} s", flush=True)


if __name__ == "__main__":
    main()
