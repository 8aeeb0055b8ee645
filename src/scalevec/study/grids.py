"""The paper's experiments (docs/paper.md) as grids of paired runs.

A study is a list of *stages*; a stage maps the knobs and the results of the earlier stages to run specs, so
a later stage can train at an optimum an earlier one found. In every comparison each arm runs on a log grid
of learning rates around its pilot optimum, every seed at every point (``stage="grid"``), and a null arm (the
baseline with another init seed, same data order) measures the noise floor of a paired difference. Budgets
(``budgets.py``) only change knobs: the grid logic is the same on a laptop and on an H100.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from scalevec.study.spec import Knobs, RunSpec
from scalevec.typed_config import ConfigError

Lookup = Callable[[RunSpec], float | None]  # score of a finished run (inf: diverged), else None
Stage = Callable[[Knobs, Lookup], list[RunSpec]]
NULL = "null"  # the null arm's name in every comparison


@dataclass
class Claim:
    """A paper claim as a paired comparison: ``arm`` minus ``ref`` is expected to have sign ``sign``."""

    text: str
    arm: str
    ref: str
    sign: int  # -1: arm has the lower loss; +1: arm has the higher loss
    paper: str = ""  # the paper's number, for the tables


@dataclass
class Study:
    name: str
    doc: str
    stages: list[tuple[str, Stage]]
    claims: list[Claim] = field(default_factory=list)


def fmt_lr(lr: float) -> str:
    return f"{lr:.3g}"


def kv(items: list[str]) -> dict[str, str]:
    return dict(x.split("=", 1) for x in items)


def non_embedding_params(overrides: dict[str, str]) -> int:
    """Non-embedding (for MoE: active non-embedding) parameters of a config, counted on the meta device."""
    import torch

    from scalevec.config import load_config
    from scalevec.info import count_params
    from scalevec.models import build_model

    cfg = load_config(None, [f"{a}={b}" for a, b in overrides.items()] + ["model.vocab_size=320"])
    with torch.device("meta"):
        counts = count_params(build_model(cfg.model, cfg.scale))
    return int(counts.get("active_non_embedding", counts["non_embedding"]))


def run_length(k: Knobs, model: dict[str, str], ratio: float = 1.0,
               arms: tuple[dict[str, str], ...] = ()) -> tuple[int, int]:
    """(steps, non-embedding params) of a run of ``model`` at ``ratio`` × the knobs' tokens per parameter,
    sized on ``model`` and lengthened when one of ``arms`` (a strategy's extra gains) would fall short."""
    base = kv(k.base)
    n = non_embedding_params({**base, **model})
    if k.steps > 0:
        return _scored_length(k, max(1, round(k.steps * ratio))), n
    tokens_per_step = int(base.get("train.batch_size", 16)) * int(base.get("train.seq_len", 128))
    steps = _scored_length(k, max(20, round(ratio * k.tokens_per_param * n / tokens_per_step)))
    largest = max([n, *(non_embedding_params({**base, **model, **a}) for a in arms)])
    if steps * tokens_per_step < ratio * k.tokens_per_param * largest:
        steps = _scored_length(k, math.ceil(ratio * k.tokens_per_param * largest / tokens_per_step))
    return steps, n


def _scored_length(k: Knobs, steps: int) -> int:
    every = max(1, round(steps * k.score_spacing))  # rounded up: scored checkpoints end at the last step
    return every * max(1, math.ceil(steps / every))


def common(k: Knobs, steps: int) -> dict[str, str]:
    """Overrides every run shares: the budget's base, the length, periodic evaluations, and checkpoints
    ``score_spacing`` apart of which the newest ``score_evals`` are scored on the whole validation split."""
    every = max(1, steps // max(1, k.eval_points))
    ckpt = max(1, round(steps * k.score_spacing))
    while steps % ckpt:  # run_length makes steps a multiple; other callers get the nearest divisor below
        ckpt -= 1
    return {**kv(k.base), "train.steps": str(steps), "train.eval_every": str(every),
            "train.ckpt_every": str(ckpt), "train.keep_ckpts": str(max(1, k.score_evals)),
            "train.log_every": str(max(1, min(10, every)))}


def shape(k: Knobs, name: str = "") -> dict[str, str]:
    name = name or k.shape or list(k.sizes)[-1]
    if name not in k.sizes:
        raise ConfigError(f"study: shape {name!r} is not in the ladder ({', '.join(k.sizes)})")
    return kv(k.sizes[name])


# ------------------------------------------------------------------------------------------ learning rates


def load_best_lrs(path: str) -> dict[str, float]:
    p = Path(path)
    if p.is_dir():
        p = p / "best_lr.json"
    if not p.is_file():
        raise ConfigError(f"lr_from: {p} does not exist (run `scalevec study lr-sweep` first)")
    return {s: float(v["lr"]) for s, v in json.loads(p.read_text()).items()}


def centre(k: Knobs, strategy: str) -> float:
    """An arm's pilot optimum: from the lr-sweep study named by ``lr_from``, else the budget's ``lr``."""
    if not k.lr_from:
        return k.lr
    table = load_best_lrs(k.lr_from)
    if strategy not in table:
        raise ConfigError(f"lr_from: {k.lr_from} has no tuned LR for strategy {strategy!r}")
    return table[strategy]


def tuned_group(k: Knobs, group: str, arms: dict[str, dict[str, str]], model: dict[str, str], steps: int,
                baseline: str = "baseline", muon: bool = False, coords: dict | None = None,
                per_lr: Callable[[float], dict[str, str]] | None = None, null: bool = True) -> list[RunSpec]:
    """Every arm on its grid (every seed at every point) plus, with ``null``, the null arm at the baseline's
    grid centre.

    AdamW: the grid is the peak LR, ``centre × lr_factors``. Muon: the gains' LR multiplier
    (``optim.lr_mult``, ``gain_lr_mult × gain_mult_factors``), the matrices at the budget's Muon LR."""
    factors = k.gain_mult_factors if muon else k.lr_factors
    if not any(math.isclose(f, 1.0) for f in factors):
        raise ConfigError("study: lr_factors / gain_mult_factors must contain 1.0 (the null arm's point)")
    specs: list[RunSpec] = []
    base_ov = {**common(k, steps), **model}
    for arm, ov in arms.items():
        strategy = ov.get("scale.strategy", "baseline")
        mid = k.gain_lr_mult if muon else centre(k, strategy)
        for f in factors:
            x = mid * f
            if muon:
                tuned = {"optim.lr": repr(centre(k, strategy)),
                         "optim.lr_mult": f"{{input_scale={x!r}, output_scale={x!r}}}"}
            else:
                tuned = {"optim.lr": repr(x), **(per_lr(x) if per_lr else {})}
            point = {**base_ov, **ov, **tuned}
            info = {**(coords or {}), "x": x, "axis": "gain lr mult" if muon else "lr", "strategy": strategy}
            specs += [RunSpec(arm, group, s, point, baseline, "grid", info) for s in range(k.seeds)]
            if null and arm == baseline and math.isclose(f, 1.0):
                specs += [RunSpec(NULL, group, s, point, baseline, "grid", {**info, "null": True},
                                  init_seed=s + k.null_init_offset) for s in range(k.seeds)]
    return specs


def grid_losses(specs: list[RunSpec], lookup: Lookup, arm: str) -> dict[tuple[float, int], float]:
    out = {}
    for sp in specs:
        if sp.arm == arm and sp.stage == "grid":
            v = lookup(sp)
            if v is not None:
                out[(sp.coords["x"], sp.seed)] = v
    return out


# ------------------------------------------------------------------------------------------------- studies


def necessity_main(k: Knobs, lookup: Lookup) -> list[RunSpec]:
    model = shape(k)
    arms = {s: {"scale.strategy": s} for s in ("baseline", "no_scale")}
    steps, _ = run_length(k, model, arms=tuple(arms.values()))
    return tuned_group(k, "necessity", arms, model, steps)


def improvements_main(k: Knobs, lookup: Lookup) -> list[RunSpec]:
    if "baseline" not in k.strategies:
        raise ConfigError("improvements: strategies must include 'baseline' (the reference of every delta)")
    model = shape(k)
    arms = {s: {"scale.strategy": s} for s in k.strategies}
    steps, _ = run_length(k, model, arms=tuple(arms.values()))
    return tuned_group(k, "improvements", arms, model, steps)


def weight_decay_main(k: Knobs, lookup: Lookup) -> list[RunSpec]:
    if "none" not in k.policies:
        raise ConfigError("weight-decay: policies must include 'none' (the baseline convention)")
    model = {**shape(k), "model.style": "gemma"}
    steps, _ = run_length(k, model)
    arms = {f"decay={p}": {"scale.strategy": "baseline", "scale.weight_decay": p} for p in k.policies}

    def decay(lr: float) -> dict[str, str]:  # η_peak · λ · T = decay_horizon at every grid point
        return {"optim.weight_decay": repr(k.decay_horizon / (lr * steps))}

    return tuned_group(k, "gemma style", arms, model, steps, baseline="decay=none", per_lr=decay)


def parse_setup(setup: str) -> tuple[str, str, str]:
    parts = setup.split("/")
    if (len(parts) != 3 or parts[0] not in ("dense", "moe") or parts[1] not in ("adamw", "muon")
            or parts[2] not in ("cosine", "wsd")):
        raise ConfigError(f"unified: setup {setup!r} must be family/optimizer/schedule with family dense|moe, "
                          "optimizer adamw|muon, schedule cosine|wsd")
    return parts[0], parts[1], parts[2]


def _rungs(k: Knobs):
    """(setup, rung, model overrides) of every comparison of the unified study."""
    from scalevec.config import load_config

    for setup in k.setups:
        family, opt, sched = parse_setup(setup)
        for size in k.setup_sizes.get(setup, list(k.sizes)):
            if size not in k.sizes:
                raise ConfigError(f"unified: size {size!r} of setup {setup!r} is not in the ladder "
                                  f"({', '.join(k.sizes)})")
            model = kv(k.sizes[size])
            if family == "moe":
                model.update(kv(k.moe))
                cfg = load_config(None, [f"{a}={b}" for a, b in {**kv(k.base), **model}.items()])
                model.setdefault("model.moe.d_expert", str(cfg.model.d_ff // cfg.model.moe.top_k))
            yield setup, size, {**model, "optim.name": opt, "schedule.name": sched}


UNIFIED_ARMS = ({"scale.strategy": "baseline"}, {"scale.strategy": "unified"})


def unified_main(k: Knobs, lookup: Lookup) -> list[RunSpec]:
    specs: list[RunSpec] = []
    for setup, size, model in _rungs(k):
        arms = {a["scale.strategy"]: a for a in UNIFIED_ARMS}
        steps, n = run_length(k, model, arms=UNIFIED_ARMS)
        tps = int(kv(k.base).get("train.batch_size", 16)) * int(kv(k.base).get("train.seq_len", 128))
        coords = {"setup": setup, "size": size, "n_params": n, "tokens": steps * tps, "ratio": 1.0}
        # the null arm sits in the first setup's groups; the other setups' claims use the study's pooled floor
        specs += tuned_group(k, f"{setup} {size}", arms, model, steps, muon=model["optim.name"] == "muon",
                             coords=coords, null=setup == k.setups[0])
    return specs


def unified_budgets(k: Knobs, lookup: Lookup) -> list[RunSpec]:
    """The first setup's rungs at each arm's grid point nearest its fitted optimum: the baseline at every token
    ratio (a schedule of its own each), unified at ratio 1 (both ratio-1 runs are grid runs, shared, not
    retrained); the compute multiplier reads these."""
    from scalevec.study.tuning import fit_optimum  # scipy: only when a study runs, not for `scalevec train`

    grid = unified_main(k, lookup)
    setup = k.setups[0]
    specs: list[RunSpec] = []
    for s, size, model in _rungs(k):
        if s != setup or model["optim.name"] == "muon":
            continue
        group = f"{setup} {size}"
        here = [sp for sp in grid if sp.group == group]
        for arm, ratios in (("baseline", k.token_ratios), ("unified", [1.0])):
            opt = fit_optimum(grid_losses(here, lookup, arm))
            if opt is None:
                raise ConfigError(f"unified: no finished grid runs of {arm} in {group} to fit its optimum")
            points = [sp for sp in here if sp.arm == arm]
            x = min({sp.coords["x"] for sp in points}, key=lambda v: abs(math.log(v / opt.lr)))
            for r in ratios:
                steps, n = run_length(k, model, r, arms=UNIFIED_ARMS)
                for src in (sp for sp in points if sp.coords["x"] == x):
                    ov = {**src.overrides, **common(k, steps)}
                    coords = {"setup": setup, "size": size, "n_params": n, "ratio": r, "lr": x, "strategy": arm}
                    specs.append(RunSpec(f"{arm} ×{r:g}", f"{group} budgets", src.seed, ov, None, "budget", coords))
    return specs


def lr_sweep_main(k: Knobs, lookup: Lookup) -> list[RunSpec]:
    model = shape(k)
    steps, _ = run_length(k, model, arms=tuple({"scale.strategy": s} for s in k.strategies))
    specs = []
    for s in k.strategies:
        for lr in k.lrs:
            ov = {**common(k, steps), **model, "scale.strategy": s, "optim.lr": repr(lr)}
            specs += [RunSpec(f"{s} lr={fmt_lr(lr)}", "lr sweep", sd, ov, None, "sweep",
                              {"x": lr, "axis": "lr", "strategy": s}) for sd in range(k.sweep_seeds)]
    return specs


def best_lrs(specs: list[RunSpec], lookup: Lookup) -> dict[str, dict]:
    """Per strategy of a sweep: the optimum of a quadratic in log LR (``tuning.fit_optimum``)."""
    from scalevec.study.tuning import fit_optimum  # scipy: only when a study runs, not for `scalevec train`

    by: dict[str, dict[tuple[float, int], float]] = defaultdict(dict)
    for sp in specs:
        v = lookup(sp)
        if sp.stage == "sweep" and v is not None:
            by[sp.coords["strategy"]][(sp.coords["x"], sp.seed)] = v
    out = {}
    for s, losses in by.items():
        opt = fit_optimum(losses)
        if opt is not None:
            out[s] = {"lr": opt.lr, "inside_grid": opt.inside, "seeds": opt.seeds, "grid": opt.grid}
    return out


STUDIES: dict[str, Study] = {
    "necessity": Study(
        "necessity", "baseline vs every scale vector removed (no_scale), each at its own best LR and at the "
                     "baseline's", [("grid", necessity_main)],
        [Claim("Removing every γ raises the loss", "no_scale", "baseline", +1,
               "+0.028 same LR, +0.015 re-tuned (0.12B)")]),
    "weight-decay": Study(
        "weight-decay", "Gemma-style model (QK-norm + post-branch norms): weight decay on no γ, all γ, "
                        "Input-Norm γ only (IWD), Output-Norm γ only; η·λ·T fixed", [("grid", weight_decay_main)],
        [Claim("IWD (decay Input-Norm γ only) beats decaying no γ", "decay=input", "decay=none", -1,
               "IWD best (Gemma-style 0.5B)"),
         Claim("IWD beats decaying all γ", "decay=input", "decay=all", -1, "IWD best (Gemma-style 0.5B)"),
         Claim("Decay on Output-Norm γ hurts", "decay=output", "decay=none", +1, "hurts (Gemma-style 0.5B)")]),
    "improvements": Study(
        "improvements", "baseline vs each improvement alone: HG, DP, DNP, OR, ER", [("grid", improvements_main)],
        [Claim(f"{s.upper()} alone lowers the loss", s, "baseline", -1, "lower (0.12B–2B)")
         for s in ("hg", "dp", "dnp", "or", "er")]),
    "unified": Study(
        "unified", "baseline vs unified (HG + DNP + OR + IWD) over a size ladder; dense and MoE, AdamW and "
                   "Muon, cosine and WSD; compute multiplier from the baseline at 1–1.5× the tokens",
        [("grid", unified_main), ("budgets", unified_budgets)],
        [Claim("Unified lowers the loss", "unified", "baseline", -1,
               "lower at 0.12B–2B; 1.22–1.25× compute; a further −0.016 to −0.019 with Muon+WSD at 0.5B")]),
    "lr-sweep": Study(
        "lr-sweep", "pilot: peak LR per strategy on a wide log grid; writes best_lr.json, the centre of every "
                    "arm's grid under `--lr-from`", [("sweep", lr_sweep_main)]),
}


def get_study(name: str) -> Study:
    if name not in STUDIES:
        raise ConfigError(f"study: unknown study {name!r}; choose from {', '.join(STUDIES)}")
    return STUDIES[name]
