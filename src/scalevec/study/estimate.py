"""The dry run's time estimate: seconds of one run from its tokens and parameter count, calibrated on the
finished runs of the output folder when it holds enough of them, else on the measured defaults below.

Model: ``seconds = c0 + tokens · (a + b·N)``, with N the non-embedding parameters and tokens the training
tokens plus a third of the evaluated ones (a forward pass is about a third of a training step). ``c0`` holds
process start, data loading and compilation; ``a`` the per-token cost that does not grow with N (embedding,
head, framework); ``b`` the cost per token and parameter. The defaults come from runs measured on the 2-core
machine with two single-threaded runs at a time (docs/studies.md, "Time").
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


@dataclass
class TimeModel:
    c0: float
    a: float
    b: float
    source: str

    def seconds(self, tokens: float, n: float) -> float:
        return self.c0 + tokens * (self.a + self.b * n)


# Measured at the cpu budget's shapes (docs/studies.md, "Time"): two runs at once on 2 cores, compiled.
DEFAULT = TimeModel(c0=25.0, a=6.0e-6, b=7.5e-11, source="measured defaults of the cpu budget")


@cache
def _params(model: tuple[tuple[str, str], ...]) -> int:
    from scalevec.study.grids import non_embedding_params

    return non_embedding_params(dict(model))


def work(spec: RunSpec) -> tuple[float, int]:
    """(token-equivalents, non-embedding parameters) of a run."""
    ov = spec.overrides
    steps = int(ov.get("train.steps", 0))
    bs, seq = int(ov.get("train.batch_size", 16)), int(ov.get("train.seq_len", 128))
    every = int(ov.get("train.eval_every", 0)) or steps
    evals = (steps // max(1, every)) * int(ov.get("data.val_tokens", 65536))
    scored = int(ov.get("train.keep_ckpts", 1)) * FULL_VAL_TOKENS
    n = spec.coords.get("n_params") or _params(tuple(sorted((k, v) for k, v in ov.items()
                                                             if k.startswith(("model.", "scale.")))))
    return steps * bs * seq + (evals + scored) / 3, int(n)


def run_seconds(spec: RunSpec, model: TimeModel) -> float:
    tokens, n = work(spec)
    return model.seconds(tokens, n)


def measured(out: Path) -> list[tuple[float, int, float]]:
    """(token-equivalents, N, seconds) of every finished, scored run under ``out/runs``."""
    rows = []
    for d in sorted(Path(out, "runs").glob("*/summary.json")):
        s = json.loads(d.read_text())
        score = d.parent / "score.json"
        resources = d.parent / "resources.json"
        if not (score.is_file() and resources.is_file()):
            continue
        sc = json.loads(score.read_text())
        seconds = json.loads(resources.read_text()).get("process_s", s["wall_s"]) + sc.get("score_s", 0.0)
        evals = (len(sc["evals"]) * sc["eval_tokens"]) / 3
        rows.append((s["tokens"] + evals, int(s["non_embedding_params"]), float(seconds)))
    return rows


def calibrate(out: Path, minimum: int = 6) -> TimeModel:
    """Refit the model on the folder's finished runs when there are ``minimum`` of them at two sizes or
    more; else the defaults."""
    rows = measured(out)
    if len(rows) < minimum or len({n for _, n, _ in rows}) < 2:
        return DEFAULT
    x = np.array([[1.0, t, t * n] for t, n, _ in rows])
    y = np.array([s for _, _, s in rows])
    scale = np.abs(x).max(0)
    coef, _ = nnls(x / scale, y)
    c0, a, b = coef / scale
    return TimeModel(float(c0), float(a), float(b), f"calibrated on {len(rows)} finished runs in {out}")
