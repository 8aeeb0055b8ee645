"""Numerical checks of the theoretical claims of docs/paper.md on small models.

``run_all`` runs every check, writes ``theory.json`` (the record), ``theory.md`` and the PNG plots;
``main`` is the command line (``scalevec theory`` / ``python -m scalevec.theory``), exit code 0 only if every
check passes its stated tolerance.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch

from scalevec.theory import descent, expressivity, magnitude, preconditioning, report, weight_decay
from scalevec.theory.common import CheckResult

__all__ = ["CheckResult", "checks", "main", "run_all"]

# (check, arguments of the full run, overrides for --fast): the fast subset keeps every claim, shrinking only
# steps and seeds, and holds each to the same tolerance.
CHECKS: list[tuple[Callable[..., CheckResult], dict, dict]] = [
    (expressivity.check_fold, {}, {}),
    (expressivity.check_output_norm, {"steps": 300}, {"steps": 150}),
    (preconditioning.check_preconditioner, {}, {}),
    (preconditioning.check_coupling, {}, {}),
    (preconditioning.check_conservation, {"horizon": 2.0}, {"horizon": 1.0}),
    (descent.check_instantaneous, {"checkpoints": (0, 50, 150)}, {"checkpoints": (0, 50)}),
    (descent.check_training, {"seeds": 5, "steps": 250}, {"seeds": 2, "steps": 150, "sweep": ()}),
    (weight_decay.check_input_sharpness, {"seeds": 3, "steps": 400}, {"seeds": 1, "steps": 200}),
    (weight_decay.check_output_expressivity, {"seeds": 3, "steps": 500}, {"seeds": 1, "steps": 150}),
    (magnitude.check_or_er, {}, {}),
    (magnitude.check_or_adamw, {"steps": 300}, {"steps": 100, "dims": (16, 64)}),
]


def checks(fast: bool = False, seed: int = 0) -> list[tuple[str, Callable[[], CheckResult]]]:
    """(name, zero-argument callable) per check, configured for a full or a fast run."""
    return [(f.__name__, lambda f=f, kw={**full, **(quick if fast else {}), "seed": seed}: f(**kw))
            for f, full, quick in CHECKS]


@contextmanager
def _threads(n: int):
    """Tiny models gain nothing from threads, and the machines running these checks are shared."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _guarded(name: str, check: Callable[[], CheckResult]) -> CheckResult:
    """Run one check; a crash is recorded as a failed check (with the error) instead of ending the run."""
    t0 = time.perf_counter()
    try:
        return check()
    except Exception as e:  # noqa: BLE001 - the report must still be written
        traceback.print_exc()
        return CheckResult(name, "(check crashed)", {"error": repr(e)}, "runs without error", False,
                           seconds=time.perf_counter() - t0)


def run_all(out_dir: Path, fast: bool = False, seed: int = 0, command: str = "") -> list[CheckResult]:
    """Run every check, then write theory.json, theory.md and the plots into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with _threads(1):
        results = [_guarded(name, c) for name, c in checks(fast, seed)]
    meta = {"command": command or f"python -m scalevec.theory --out {out_dir}" + (" --fast" if fast else ""),
            "seed": seed, "fast": fast, "torch": torch.__version__, "threads": 1,
            "seconds": time.perf_counter() - t0}
    data = report.to_data(results, meta)
    report.write_json(data, out_dir / "theory.json")
    report.write_plots(data, out_dir)
    (out_dir / "theory.md").write_text(report.markdown(data))
    return results


def main(argv: list[str] | None = None) -> int:
    """``scalevec theory --out DIR [--fast] [--seed N] [--doc FILE]``; returns 0 only if every check passes."""
    ap = argparse.ArgumentParser(prog="scalevec theory", description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="folder for theory.json, theory.md and the plots")
    ap.add_argument("--fast", action="store_true", help="fewer steps and seeds (the test-suite subset)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--doc", type=Path, help="also write the report here, with image links into --out")
    args = ap.parse_args(argv)
    command = "scalevec theory " + " ".join(sys.argv[1:] if argv is None else argv)
    results = run_all(args.out, fast=args.fast, seed=args.seed, command=command)
    data = report.read_json(args.out / "theory.json")  # views render from the record, not from live objects
    print(report.text_table(data))
    if args.doc:
        prefix = Path(os.path.relpath(args.out.resolve(), args.doc.parent.resolve())).as_posix() + "/"
        args.doc.write_text(report.markdown(data, image_prefix=prefix))
    return 0 if all(r.passed for r in results) else 1
