"""A study folder as data: its manifest, and every run with its summary, score, metrics and resources."""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from scalevec.study.spec import RunSpec
from scalevec.study.worker import SCORE_FILE
from scalevec.typed_config import ConfigError


@dataclass
class Run:
    spec: RunSpec
    path: Path
    status: str
    summary: dict = field(default_factory=dict)
    resources: dict = field(default_factory=dict)
    scored: dict = field(default_factory=dict)

    @property
    def loss(self) -> float | None:
        """The score: mean of the last evaluations on the whole validation split (the final periodic
        evaluation for runs from before scoring); +inf when the run diverged; None while unfinished."""
        if "score" in self.scored:
            return float(self.scored["score"])
        if "final_val_loss" in self.summary:
            return float(self.summary["final_val_loss"])
        return math.inf if self.status == "diverged" else None

    def metrics(self) -> list[dict]:
        p = self.path / "metrics.jsonl"
        return [json.loads(ln) for ln in p.read_text().splitlines() if ln] if p.is_file() else []

    @property
    def n_params(self) -> float:
        s = self.summary
        return s.get("active_non_embedding_params", s.get("non_embedding_params", math.nan))

    @property
    def compute(self) -> float:
        """C = 6·N·D, N = non-embedding (active for MoE) parameters, D = training tokens."""
        return 6.0 * self.n_params * self.summary.get("tokens", math.nan)


def read_json(p: Path) -> dict:
    return json.loads(p.read_text()) if p.is_file() else {}


def load_study(study_dir: Path) -> tuple[dict, list[Run]]:
    man_path = study_dir / "study.json"
    if not man_path.is_file():
        raise ConfigError(f"report: {study_dir} holds no study.json")
    man = json.loads(man_path.read_text())
    runs = []
    seen: set[tuple[str, str]] = set()
    for r in man["runs"]:
        spec = RunSpec.from_json(r)
        if (spec.group, spec.key) in seen:  # the same run listed twice in one group
            continue
        seen.add((spec.group, spec.key))
        path = (study_dir / r["run_dir"]).resolve()
        summary = read_json(path / "summary.json")
        failed = read_json(path / "failed.json")
        status = "done" if summary else failed.get("kind", "missing")
        runs.append(Run(spec, path, status, summary, read_json(path / "resources.json"), read_json(path / SCORE_FILE)))
    return man, runs


def groups_of(runs: list[Run]) -> dict[str, list[Run]]:
    out: dict[str, list[Run]] = defaultdict(list)
    for r in runs:
        out[r.spec.group].append(r)
    return out


def by_seed(runs: list[Run], arm: str) -> dict[int, float]:
    return {r.spec.seed: r.loss for r in runs if r.spec.arm == arm and r.loss is not None}


def grid(runs: list[Run], arm: str) -> dict[tuple[float, int], float]:
    """{(grid value, seed): score} of an arm's grid runs."""
    return {(r.spec.coords["x"], r.spec.seed): r.loss for r in runs
            if r.spec.arm == arm and r.spec.stage == "grid" and r.loss is not None}


def arms_in_order(runs: list[Run]) -> list[str]:
    return list(dict.fromkeys(r.spec.arm for r in runs))


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_").lower()
