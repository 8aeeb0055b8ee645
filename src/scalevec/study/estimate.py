"""The dry run's time estimate, calibrated on measured runs.

A run costs ``start + tokens · (a + b·N)``: ``start`` is data loading and compilation (the first logging
window of a run; process start goes with the per-token terms), ``tokens`` the training tokens plus half the evaluated ones (an eager forward
pass costs about half a compiled training step per token at these widths), N the non-embedding parameters.
The first run of each distinct model graph in a study pays a cold compile (``cold``) instead of a warm one
(``warm``: inductor's on-disk cache). ``calibrate`` fits ``a``, ``b``, ``warm`` and ``cold`` on the finished runs
of an output folder when it holds enough of them, else uses the defaults measured for the cpu budget
(docs/studies.md, "Budgets and time").
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
from scipy.optimize import nnls

from scalevec.study.spec import RunSpec

FULL_VAL_TOKENS = 500_000  # byte-level Shakespeare's validation split, for runs whose corpus is not scored yet
EVAL_WEIGHT = 0.5


@dataclass
class TimeModel:
    warm: float  # seconds to the end of the first logging window, compile cache warm
    cold: float  # the same with a cold compile (first run of a graph)
    a: float  # seconds per token
    b: float  # seconds per token and non-embedding parameter
    source: str

    def seconds(self, tokens: float, n: float, cold: bool = False) -> float:
        return (self.cold if cold else self.warm) + tokens * (self.a + self.b * n)


# Fitted on the measured runs of docs/studies.md ("Budgets and time"): 2 cores, two runs at once.
DEFAULT = TimeModel(warm=8.7, cold=15.4, a=1.67e-5, b=0.0, source="measured defaults of the cpu budget")


@cache
def _params(model: tuple[tuple[str, str], ...]) -> int:
    from scalevec.study.grids import non_embedding_params

    return non_embedding_params(dict(model))


def _graph(spec: RunSpec) -> tuple[tuple[str, str], ...]:
    """What a compiled graph depends on: the model and the scale strategy (not the LR, decay or seed)."""
    return tuple(sorted((k, v) for k, v in spec.overrides.items() if k.startswith(("model.", "scale."))
                        and k != "scale.weight_decay"))


def work(spec: RunSpec) -> tuple[float, int]:
    """(token-equivalents, non-embedding parameters) of a run."""
    ov = spec.overrides
    steps = int(ov.get("train.steps", 0))
    bs, seq = int(ov.get("train.batch_size", 16)), int(ov.get("train.seq_len", 128))
    every = int(ov.get("train.eval_every", 0)) or steps
    evals = (steps // max(1, every)) * int(ov.get("data.val_tokens", 65536))
    scored = int(ov.get("train.keep_ckpts", 1)) * FULL_VAL_TOKENS
    n = spec.coords.get("n_params") or _params(_graph(spec))
    return steps * bs * seq + EVAL_WEIGHT * (evals + scored), int(n)


def study_seconds(specs: list[RunSpec], model: TimeModel) -> float:
    """Summed seconds of ``specs``; the first run of each graph compiles cold."""
    seen: set = set()
    total = 0.0
    for sp in specs:
        g = _graph(sp)
        tokens, n = work(sp)
        total += model.seconds(tokens, n, cold=g not in seen)
        seen.add(g)
    return total


def measured(out: Path) -> list[tuple[float, int, float, float]]:
    """(token-equivalents after the first window, N, seconds after it, seconds of the first window) of every
    finished, scored run under ``out/runs``."""
    rows = []
    for d in sorted(Path(out, "runs").glob("*/score.json")):
        run = d.parent
        try:
            s = json.loads((run / "summary.json").read_text())
            sc = json.loads(d.read_text())
            res = json.loads((run / "resources.json").read_text())
            first = next(json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()
                         if "tok_per_s" in ln)
        except (OSError, StopIteration, json.JSONDecodeError):
            continue
        first_tokens = first["tokens"]
        first_s = first_tokens / first["tok_per_s"]
        whole = res.get("runner_s", res.get("process_s", s["wall_s"]) + sc.get("score_s", 0.0))
        seconds = whole - first_s
        evals = EVAL_WEIGHT * len(sc["evals"]) * sc["eval_tokens"]
        periodic = EVAL_WEIGHT * sum(1 for ln in (run / "metrics.jsonl").read_text().splitlines() if "val_loss" in ln) \
            * min(sc["eval_tokens"], 65536)
        rows.append((s["tokens"] - first_tokens + evals + periodic, int(s["non_embedding_params"]), seconds, first_s))
    return rows


# Budgets without measured defaults (the gpu budget has not run yet) get an estimate only from their own runs.
DEFAULTS = {"cpu": DEFAULT, "smoke": DEFAULT}


def calibrate(out: Path, minimum: int = 6, default: TimeModel | None = DEFAULT) -> TimeModel | None:
    """Refit on the folder's finished runs when there are ``minimum`` of them at two sizes or more; else
    ``default``."""
    rows = measured(out)
    if len(rows) < minimum or len({n for _, n, _, _ in rows}) < 2:
        return default
    x = np.array([[t, t * n] for t, n, _, _ in rows])
    y = np.array([s for _, _, s, _ in rows])
    scale = np.abs(x).max(0)
    coef, _ = nnls(x / scale, y)
    a, b = coef / scale
    first = np.array([f for *_, f in rows])
    return TimeModel(float(np.median(first)), float(np.quantile(first, 0.9)), float(a), float(b),
                     f"calibrated on {len(rows)} finished runs in {out}")
