"""Run specs and study knobs: a study is data (a list of paired runs), not code paths.

A ``RunSpec`` is one training run: config overrides plus a seed. The seed sets both the model init
(``train.seed``) and the data order (``data.seed``), so every arm of a comparison that shares a seed index is
a *paired* run: same initial weights where shapes agree, same batches in the same order. The null arm moves
only the init seed (``init_seed``), the one thing an arm that changes the parameterisation also changes. The
run directory name is derived from the resolved overrides, so two studies that ask for the same run share one
directory and a rerun skips it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scalevec.typed_config import ConfigError, load_toml, update


def _as_dict(overrides: list[str] | tuple[str, ...] | dict[str, str]) -> dict[str, str]:
    if isinstance(overrides, dict):
        return {k: str(v) for k, v in overrides.items()}
    out: dict[str, str] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out


@dataclass
class RunSpec:
    """One run of a study.

    ``group`` names a comparison: arms are compared inside a group, paired by ``seed``, against the arm named
    ``baseline`` (``None``: the group is a sweep, listed without deltas). ``coords`` holds the numbers plots
    need (lr, size, ...).
    """

    arm: str
    group: str
    seed: int
    overrides: dict[str, str]
    baseline: str | None = "baseline"
    stage: str = "main"
    coords: dict[str, Any] = field(default_factory=dict)
    init_seed: int | None = None  # the model init's seed where it differs from ``seed`` (the null arm)

    def config_overrides(self) -> list[str]:
        init = self.seed if self.init_seed is None else self.init_seed
        table = {**self.overrides, "train.seed": str(init), "data.seed": str(self.seed)}
        return [f"{k}={v}" for k, v in sorted(table.items())]

    @property
    def key(self) -> str:
        """Directory name: readable prefix plus a hash of everything that determines the run."""
        digest = hashlib.sha1("\n".join(self.config_overrides()).encode()).hexdigest()[:8]
        strategy = self.overrides.get("scale.strategy", "baseline")
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{strategy}-s{self.seed}")
        return f"{slug}-{digest}"

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "key": self.key}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> RunSpec:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class Knobs:
    """The configurable part of a study grid. Every field can be set with ``--set key=value`` or a TOML
    ``--grid`` file; the per-budget defaults live in ``budgets.BUDGETS``."""

    seeds: int = 5
    tokens_per_param: float = 30.0  # training tokens per non-embedding parameter; sets every run's steps
    steps: int = 0  # optimizer steps per run when > 0 (overrides tokens_per_param; smoke tests)
    lr: float = 3e-3  # the pilot optimum: centre of every arm's LR grid without lr_from
    lr_factors: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])  # each arm's grid: centre × these
    lr_from: str = ""  # an lr-sweep (pilot) study folder or its best_lr.json: each strategy's grid centre
    gain_lr_mult: float = 3.0  # Muon: centre of the gains' LR-multiplier grid (optim.lr_mult of the gains)
    gain_mult_factors: list[float] = field(default_factory=lambda: [1 / 3, 1.0, 3.0])
    null_init_offset: int = 1000  # the null arm: the baseline with init seed = seed + this, same data order
    lrs: list[float] = field(default_factory=lambda: [1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2])  # lr-sweep (pilot) grid
    sweep_seeds: int = 1  # seeds per point of the lr-sweep (pilot)
    strategies: list[str] = field(default_factory=lambda: ["baseline", "hg", "dp", "dnp", "or", "er"])
    policies: list[str] = field(default_factory=lambda: ["none", "all", "input", "output"])
    decay_horizon: float = 3.0  # weight-decay study: λ = decay_horizon / (η_peak · steps) at every grid LR
    # unified: the size ladder (name -> model overrides); setups are (family, optimizer, schedule) triples,
    # each run over setup_sizes[setup] (default: the whole ladder)
    sizes: dict[str, list[str]] = field(default_factory=dict)
    shape: str = ""  # the ladder rung every run of the other studies uses ("" = the ladder's last)
    setups: list[str] = field(default_factory=lambda: ["dense/adamw/cosine"])
    setup_sizes: dict[str, list[str]] = field(default_factory=dict)
    token_ratios: list[float] = field(default_factory=lambda: [1.0, 1.25, 1.5])  # baseline budgets (multiplier)
    moe: list[str] = field(default_factory=lambda: ["model.moe.num_experts=4", "model.moe.top_k=2"])
    base: list[str] = field(default_factory=list)  # overrides applied to every run
    eval_points: int = 10  # periodic evaluations per run on a fixed validation slice (curves, γ statistics)
    score_evals: int = 3  # the score: mean of the newest this many checkpoints, each on the whole split
    score_spacing: float = 0.05  # steps between those checkpoints, as a share of the run
    score_tokens: int = 0  # validation tokens each score evaluation reads (0: the whole split)

    def set(self, key: str, text: str) -> None:
        """``--set key=value``: typed and strict like every other config in the project."""
        update(self, {key: text}, prefix="study.")
        if key == "sizes":
            self.setup_sizes = {}

    def load(self, path: str | Path) -> None:
        """A TOML grid file: knobs at the top level or under ``[study]``."""
        table = load_toml(path)
        table = table.get("study", table)
        update(self, table, prefix="study.")
        if "sizes" in table and "setup_sizes" not in table:
            self.setup_sizes = {}  # the budget's per-setup sizes name the budget's ladder, not this one

    def to_json(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))
