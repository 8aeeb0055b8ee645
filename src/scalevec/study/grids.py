"""The paper's experiments (PAPER.md section 4) as grids of paired runs.

A study is a list of *stages*; a stage maps the knobs and the results of the earlier stages to run specs, so
an LR sweep can feed the runs that use its best LR. Every arm of a comparison shares the seeds of its
baseline (``RunSpec``: same init, same data order). Budgets only change knobs: the grid logic is the same on a
laptop and on an H100.
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

Lookup = Callable[
    [RunSpec], float | None
]  # final validation loss of a finished run (inf: diverged), else None
Stage = Callable[[Knobs, Lookup], list[RunSpec]]

TOKENS_PER_STEP_CPU = 16 * 128

# Shared by every run of a budget; a study adds its own overrides on top. Byte-level Shakespeare keeps the
# CPU runs free of tokenizer training and makes the loss comparable with the calibration in the issue.
BASE = {
    "cpu": [
        "model.preset=tiny",
        "data.tokenizer=byte",
        "train.batch_size=16",
        "train.seq_len=128",
        "train.precision=bf16",
        "optim.name=adamw",
        "schedule.name=cosine",
        "train.keep_ckpts=1",
    ],
    "gpu": [
        "model.preset=small",
        "data.tokenizer=gpt2",
        "train.batch_size=32",
        "train.seq_len=512",
        "train.precision=bf16",
        "optim.name=adamw",
        "schedule.name=cosine",
        "train.keep_ckpts=1",
    ],
}

# The ladder of the unified study. CPU: three widths of the tiny shape (non-embedding 0.13M, 0.44M, 1.05M).
# GPU: the 0.12B-scale ladder of the issue (6M, 30M, 120M non-embedding). The gpu budget has not been run in
# this project yet; its runs compile under train.compile="auto" (they are longer than the threshold).
LADDERS = {
    "cpu": {
        "xs": ["model.preset=tiny", "model.d_model=64", "model.n_layers=2", "model.d_ff=256"],
        "s": ["model.preset=tiny", "model.d_model=96", "model.n_layers=3", "model.d_ff=384"],
        "m": ["model.preset=tiny"],
    },
    "gpu": {
        "6m": ["model.preset=small"],
        "30m": [
            "model.preset=small",
            "model.d_model=512",
            "model.n_layers=8",
            "model.n_heads=8",
            "model.d_ff=1536",
        ],
        "120m": ["model.preset=0.12b"],
    },
}

# Knob defaults per budget and study. CPU: each study fits 60 minutes on 2 cores at the measured ~10.8k tokens/s
# of one single-threaded compiled tiny run (two runs at once); fewer, longer runs where the budget forces a choice.
BUDGETS: dict[str, dict[str, dict]] = {
    "cpu": {
        "necessity": {"seeds": 5, "steps": 500, "sweep_seeds": 1, "lrs": [1.5e-3, 3e-3, 6e-3, 1.2e-2]},
        "weight-decay": {"seeds": 5, "steps": 700},
        "improvements": {"seeds": 5, "steps": 500},
        "unified": {
            "seeds": 2,
            "tokens_per_param": 1.5,
            "setups": ["dense/adamw/cosine", "moe/adamw/cosine", "dense/muon/cosine", "dense/adamw/wsd"],
            "setup_sizes": {
                "moe/adamw/cosine": ["xs", "s"],
                "dense/muon/cosine": ["xs", "s"],
                "dense/adamw/wsd": ["xs", "s"],
            },
        },
        "lr-sweep": {
            "sweep_seeds": 1,
            "steps": 300,
            "lrs": [1.5e-3, 3e-3, 6e-3, 1.2e-2],
            "strategies": ["baseline", "no_scale", "hg", "dp", "dnp", "or", "er", "unified"],
        },
    },
    "gpu": {
        "necessity": {
            "seeds": 5,
            "steps": 4000,
            "sweep_seeds": 2,
            "lr": 1e-3,
            "lrs": [5e-4, 1e-3, 2e-3, 4e-3],
        },
        "weight-decay": {"seeds": 5, "steps": 4000, "lr": 1e-3},
        "improvements": {"seeds": 5, "steps": 4000, "lr": 1e-3},
        "unified": {
            "seeds": 2,
            "tokens_per_param": 20.0,
            "lr": 1e-3,
            "setups": [
                "dense/adamw/cosine",
                "moe/adamw/cosine",
                "dense/muon/cosine",
                "dense/adamw/wsd",
                "dense/muon/wsd",
                "moe/muon/wsd",
            ],
            "moe": ["model.moe.num_experts=8", "model.moe.top_k=2"],
        },
        "lr-sweep": {
            "sweep_seeds": 1,
            "steps": 4000,
            "lrs": [2.5e-4, 5e-4, 1e-3, 2e-3, 4e-3],
            "strategies": ["baseline", "no_scale", "hg", "dp", "dnp", "or", "er", "unified"],
        },
    },
}


@dataclass
class Claim:
    """A paper claim as a paired comparison: ``arm`` minus ``ref`` is expected to have sign ``sign``."""

    text: str
    arm: str
    ref: str
    sign: int  # -1: arm has the lower loss; +1: arm has the higher loss
    group: str = ""  # substring the comparison group must contain ("" = every group with both arms)


@dataclass
class Study:
    name: str
    doc: str
    stages: list[tuple[str, Stage]]
    claims: list[Claim] = field(default_factory=list)


def knobs_for(study: str, budget: str) -> Knobs:
    if budget not in BUDGETS:
        raise ConfigError(f"--budget: {budget!r} is not one of {', '.join(BUDGETS)}")
    k = Knobs(sizes=dict(LADDERS[budget]), base=list(BASE[budget]) + _compile(budget))
    for key, value in BUDGETS[budget][get_study(study).name].items():
        setattr(k, key, value)
    return k


def _compile(budget: str) -> list[str]:
    """CPU: compile every run, also the short ones train.compile="auto" leaves eager (measured ~2x the
    tokens/s of two single-threaded tiny runs), when inductor can build CPU kernels (``cpu_compiler_available``)."""
    from scalevec.train.trainer import cpu_compiler_available

    return ["train.compile=true"] if budget == "cpu" and cpu_compiler_available() else []


def common(k: Knobs, steps: int | None = None) -> dict[str, str]:
    """Overrides every run shares: the budget's base, the step count and evaluations spread over the run."""
    steps = steps or k.steps
    every = max(1, steps // max(1, k.eval_points))
    out = dict(kv.split("=", 1) for kv in k.base)
    out.update(
        {
            "train.steps": str(steps),
            "train.eval_every": str(every),
            "train.ckpt_every": str(every),
            "train.log_every": str(max(1, min(10, every))),
        }
    )
    return out


def fmt_lr(lr: float) -> str:
    return f"{lr:.3g}"


# ----------------------------------------------------------------------------------------------- LR sweeps


def sweep_specs(
    k: Knobs, strategies: list[str], extra: dict[str, str] | None = None, group: str = "lr sweep"
) -> list[RunSpec]:
    out = []
    for s in strategies:
        for lr in k.lrs:
            for seed in range(k.sweep_seeds):
                ov = {**common(k), **(extra or {}), "scale.strategy": s, "optim.lr": repr(lr)}
                out.append(
                    RunSpec(
                        arm=f"{s} lr={fmt_lr(lr)}",
                        group=group,
                        seed=seed,
                        overrides=ov,
                        baseline=None,
                        stage="sweep",
                        coords={"lr": lr, "strategy": s},
                    )
                )
    return out


def best_lrs(specs: list[RunSpec], lookup: Lookup) -> dict[str, dict]:
    """Per strategy: the grid LR with the lowest mean final loss (diverged runs count as +inf)."""
    losses: dict[tuple[str, float], list[float]] = defaultdict(list)
    for sp in specs:
        if sp.baseline is None and "lr" in sp.coords:
            v = lookup(sp)
            if v is not None:
                losses[(sp.coords["strategy"], sp.coords["lr"])].append(v if math.isfinite(v) else math.inf)
    best: dict[str, dict] = {}
    for (s, lr), vals in sorted(losses.items()):
        mean = sum(vals) / len(vals)
        if s not in best or mean < best[s]["loss"]:
            best[s] = {"lr": lr, "loss": mean, "seeds": len(vals)}
    grid = sorted({sp.coords["lr"] for sp in specs if "lr" in sp.coords})
    for b in best.values():
        b["at_grid_edge"] = b["lr"] in (grid[0], grid[-1]) if len(grid) > 1 else True
    return best


def load_best_lrs(path: str) -> dict[str, float]:
    p = Path(path)
    if p.is_dir():
        p = p / "best_lr.json"
    if not p.is_file():
        raise ConfigError(f"lr_from: {p} does not exist (run `scalevec study lr-sweep` first)")
    return {s: float(v["lr"]) for s, v in json.loads(p.read_text()).items()}


def lr_for(k: Knobs, strategy: str) -> float:
    if not k.lr_from:
        return k.lr
    table = load_best_lrs(k.lr_from)
    if strategy not in table:
        raise ConfigError(f"lr_from: {k.lr_from} has no tuned LR for strategy {strategy!r}")
    return table[strategy]


def lr_label(k: Knobs) -> str:
    return "tuned LR (lr-sweep)" if k.lr_from else f"lr={fmt_lr(k.lr)}"


# ---------------------------------------------------------------------------------------------- the studies


def _paired(
    k: Knobs,
    group: str,
    arms: dict[str, dict[str, str]],
    baseline: str = "baseline",
    stage: str = "main",
    coords: dict | None = None,
) -> list[RunSpec]:
    return [
        RunSpec(
            arm=a,
            group=group,
            seed=seed,
            overrides=ov,
            baseline=baseline,
            stage=stage,
            coords={**(coords or {}), **({"lr": float(ov["optim.lr"])} if "optim.lr" in ov else {})},
        )
        for seed in range(k.seeds)
        for a, ov in arms.items()
    ]


NECESSITY = ("baseline", "no_scale")


def necessity_sweep(k: Knobs, lookup: Lookup) -> list[RunSpec]:
    return [] if k.lr_from else sweep_specs(k, list(NECESSITY))


def necessity_main(k: Knobs, lookup: Lookup) -> list[RunSpec]:
    same = {s: {**common(k), "scale.strategy": s, "optim.lr": repr(k.lr)} for s in NECESSITY}
    specs = _paired(k, f"same LR (lr={fmt_lr(k.lr)})", same)
    if k.lr_from:
        tuned = {s: lr_for(k, s) for s in NECESSITY}
    else:
        best = best_lrs(necessity_sweep(k, lookup), lookup)
        missing = [s for s in NECESSITY if s not in best]
        if missing:
            raise ConfigError(f"necessity: the LR sweep has no finished run for {', '.join(missing)}")
        tuned = {s: best[s]["lr"] for s in NECESSITY}
    retuned = {s: {**common(k), "scale.strategy": s, "optim.lr": repr(tuned[s])} for s in NECESSITY}
    return specs + _paired(k, "re-tuned LR", retuned)


def improvements_main(k: Knobs, lookup: Lookup) -> list[RunSpec]:
    if "baseline" not in k.strategies:
        raise ConfigError("improvements: strategies must include 'baseline' (the reference of every delta)")
    arms = {s: {**common(k), "scale.strategy": s, "optim.lr": repr(lr_for(k, s))} for s in k.strategies}
    return _paired(k, lr_label(k), arms)


def weight_decay_main(k: Knobs, lookup: Lookup) -> list[RunSpec]:
    if "none" not in k.policies:
        raise ConfigError("weight-decay: policies must include 'none' (the baseline convention)")
    lr = lr_for(k, "baseline")
    arms = {
        f"decay={p}": {
            **common(k),
            "model.style": "gemma",
            "scale.strategy": "baseline",
            "scale.weight_decay": p,
            "optim.lr": repr(lr),
        }
        for p in k.policies
    }
    return _paired(k, f"gemma style, lr={fmt_lr(lr)}", arms, baseline="decay=none")


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


def parse_setup(setup: str) -> tuple[str, str, str]:
    parts = setup.split("/")
    if (
        len(parts) != 3
        or parts[0] not in ("dense", "moe")
        or parts[1] not in ("adamw", "muon")
        or parts[2] not in ("cosine", "wsd")
    ):
        raise ConfigError(
            f"unified: setup {setup!r} must be family/optimizer/schedule with family dense|moe, "
            "optimizer adamw|muon, schedule cosine|wsd"
        )
    return parts[0], parts[1], parts[2]


def unified_main(k: Knobs, lookup: Lookup) -> list[RunSpec]:
    from scalevec.config import load_config

    base = dict(kv.split("=", 1) for kv in k.base)
    specs: list[RunSpec] = []
    for setup in k.setups:
        family, opt, sched = parse_setup(setup)
        for size in k.setup_sizes.get(setup, list(k.sizes)):
            if size not in k.sizes:
                raise ConfigError(
                    f"unified: size {size!r} of setup {setup!r} is not in the ladder ({', '.join(k.sizes)})"
                )
            model = dict(kv.split("=", 1) for kv in k.sizes[size])
            if family == "moe":
                model.update(dict(kv.split("=", 1) for kv in k.moe))
            cfg = load_config(None, [f"{a}={b}" for a, b in {**base, **model}.items()])
            if family == "moe" and "model.moe.d_expert" not in model:  # keep the dense MLP's active width
                model["model.moe.d_expert"] = str(cfg.model.d_ff // cfg.model.moe.top_k)
            n = non_embedding_params({**base, **model})
            tokens_per_step = cfg.train.batch_size * cfg.train.seq_len * cfg.train.grad_accum
            steps = max(20, round(k.tokens_per_param * n / tokens_per_step))
            arms = {
                s: {
                    **common(k, steps),
                    **model,
                    "optim.name": opt,
                    "schedule.name": sched,
                    "scale.strategy": s,
                    "optim.lr": repr(lr_for(k, s)),
                }
                for s in ("baseline", "unified")
            }
            coords = {"setup": setup, "size": size, "n_params": n, "tokens": steps * tokens_per_step}
            specs += _paired(k, f"{setup} {size}", arms, coords=coords)
    return specs


def lr_sweep_main(k: Knobs, lookup: Lookup) -> list[RunSpec]:
    return sweep_specs(k, k.strategies)


STUDIES: dict[str, Study] = {
    "necessity": Study(
        "necessity",
        "baseline vs every scale vector removed (no_scale), at the same LR and at each one's best LR "
        "from an LR sweep",
        [("sweep", necessity_sweep), ("main", necessity_main)],
        [
            Claim(
                "Removing every γ raises the final loss at the same LR (paper: +0.028 at 0.12B)",
                "no_scale",
                "baseline",
                +1,
                "same LR",
            ),
            Claim(
                "...and still after re-tuning the LR for each (paper: +0.015)",
                "no_scale",
                "baseline",
                +1,
                "re-tuned",
            ),
        ],
    ),
    "weight-decay": Study(
        "weight-decay",
        "Gemma-style model (QK-norm + post-branch norms): weight decay on no γ, all γ, Input-Norm γ "
        "only (IWD), Output-Norm γ only",
        [("main", weight_decay_main)],
        [
            Claim("IWD (decay Input-Norm γ only) beats decaying no γ", "decay=input", "decay=none", -1),
            Claim("IWD beats decaying all γ", "decay=input", "decay=all", -1),
            Claim(
                "Decay on Output-Norm γ hurts (output-only worse than none)", "decay=output", "decay=none", +1
            ),
        ],
    ),
    "improvements": Study(
        "improvements",
        "baseline vs each improvement alone: HG, DP, DNP, OR, ER",
        [("main", improvements_main)],
        [
            Claim(f"{s.upper()} alone lowers the final loss", s, "baseline", -1)
            for s in ("hg", "dp", "dnp", "or", "er")
        ],
    ),
    "unified": Study(
        "unified",
        "baseline vs unified (HG + DNP + OR + IWD) over a size ladder; dense and MoE, AdamW and Muon, "
        "cosine and WSD; scaling-law fit and compute multiplier",
        [("main", unified_main)],
        [
            Claim(
                "Unified lowers the final loss (every size, family, optimizer, schedule)",
                "unified",
                "baseline",
                -1,
            )
        ],
    ),
    "lr-sweep": Study(
        "lr-sweep",
        "peak LR per strategy on a log grid; writes best_lr.json for `--set lr_from=DIR`",
        [("sweep", lr_sweep_main)],
    ),
}


def get_study(name: str) -> Study:
    if name not in STUDIES:
        raise ConfigError(f"study: unknown study {name!r}; choose from {', '.join(STUDIES)}")
    return STUDIES[name]
