"""Budgets: knob defaults for each study on a given machine. The design is the same in every budget (tuned
arms, a null arm, scores on the whole validation split, at least 20 tokens per parameter); a budget only
chooses the shapes, seeds and batch that fit its time.

- ``cpu``: 2 cores, two single-threaded runs at once, each study within 90 minutes.
- ``gpu``: one H100, sized for 8 minutes per study, many runs at once; the prepared byte-level Shakespeare
  shards travel with the command (``SCALEVEC_CACHE``: docs/studies.md).
- ``smoke``: the whole pipeline on toy shapes in a minute or two (the end-to-end test).

Tokenizer: byte-level in every budget, so a loss is in nats per byte (= nats per token) and comparable across
budgets and with the calibration of earlier studies.
"""

from __future__ import annotations

from scalevec.study.spec import Knobs
from scalevec.typed_config import ConfigError

UNITS = "nats per byte (byte-level tokenizer: one token per byte)"

_SCHEDULE = ["schedule.warmup=0.05", "schedule.min_lr_ratio=0.01", "schedule.decay_fraction=0.2"]

BASE = {
    "cpu": ["model.preset=tiny", "data.tokenizer=byte", "train.batch_size=32", "train.seq_len=128",
            "train.precision=bf16", "optim.name=adamw", "schedule.name=cosine", "data.val_tokens=16384",
            *_SCHEDULE],
    "gpu": ["model.preset=tiny", "data.tokenizer=byte", "train.batch_size=64", "train.seq_len=256",
            "train.precision=bf16", "optim.name=adamw", "schedule.name=cosine", *_SCHEDULE],
    "smoke": ["model.preset=tiny", "data.tokenizer=byte", "train.batch_size=4", "train.seq_len=32",
              "train.precision=fp32", "optim.name=adamw", "schedule.name=cosine", "train.compile=false",
              "data.val_tokens=512", *_SCHEDULE],
}


def _shape(d: int, layers: int, ff: int, heads: int = 4) -> list[str]:
    return ["model.preset=tiny", f"model.d_model={d}", f"model.n_layers={layers}", f"model.d_ff={ff}",
            f"model.n_heads={heads}"]


# Rungs named by their non-embedding parameters (dense Llama style; see `scalevec info`).
LADDERS = {
    "cpu": {"27k": _shape(32, 2, 96), "33k": _shape(32, 2, 128), "74k": _shape(48, 2, 192),
            "131k": _shape(64, 2, 256), "197k": _shape(64, 3, 256)},
    "gpu": {"74k": _shape(48, 2, 192), "197k": _shape(64, 3, 256), "443k": _shape(96, 3, 384)},
    "smoke": {"a": _shape(16, 1, 32, 2), "b": _shape(24, 1, 48, 2), "c": _shape(32, 2, 64, 2)},
}

# dense and MoE, AdamW and Muon, cosine and WSD: the paper's Muon + WSD claim is its own setup
_UNIFIED_SETUPS = ["dense/adamw/cosine", "moe/adamw/cosine", "dense/muon/wsd"]

BUDGETS: dict[str, dict[str, dict]] = {
    "cpu": {
        "_all": {"shape": "74k", "lr": 4e-3},
        "necessity": {"seeds": 6, "tokens_per_param": 30.0},
        "weight-decay": {"seeds": 5, "tokens_per_param": 30.0},
        "improvements": {"seeds": 4, "tokens_per_param": 30.0},
        "unified": {
            "seeds": 3,
            "tokens_per_param": 20.0,
            "setups": _UNIFIED_SETUPS,
            "setup_sizes": {"dense/adamw/cosine": ["27k", "74k", "131k"], "moe/adamw/cosine": ["27k"],
                            "dense/muon/wsd": ["27k"]},
        },
        "lr-sweep": {"sweep_seeds": 1, "tokens_per_param": 30.0,
                     "strategies": ["baseline", "no_scale", "hg", "dp", "dnp", "or", "er", "unified"]},
    },
    "gpu": {
        "_all": {"shape": "443k", "lr": 3e-3},
        "necessity": {"seeds": 8, "tokens_per_param": 30.0},
        "weight-decay": {"seeds": 6, "tokens_per_param": 30.0},
        "improvements": {"seeds": 4, "tokens_per_param": 30.0},
        "unified": {
            "seeds": 4,
            "tokens_per_param": 20.0,
            "setups": _UNIFIED_SETUPS,
            "setup_sizes": {"dense/adamw/cosine": ["74k", "197k", "443k"], "moe/adamw/cosine": ["74k"],
                            "dense/muon/wsd": ["74k"]},
            "moe": ["model.moe.num_experts=8", "model.moe.top_k=2"],
        },
        "lr-sweep": {"sweep_seeds": 2, "tokens_per_param": 30.0,
                     "strategies": ["baseline", "no_scale", "hg", "dp", "dnp", "or", "er", "unified"]},
    },
    "smoke": {
        "_all": {"shape": "c", "steps": 24, "seeds": 2, "eval_points": 4, "score_spacing": 0.1, "lr": 1e-2,
                 "score_tokens": 4096},
        "necessity": {},
        "weight-decay": {},
        "improvements": {"strategies": ["baseline", "hg"]},
        "unified": {"setups": ["dense/adamw/cosine", "dense/adamw/wsd"], "token_ratios": [1.0, 1.5, 2.0],
                    "setup_sizes": {"dense/adamw/wsd": ["a"]}},
        "lr-sweep": {"lrs": [3e-3, 1e-2, 3e-2], "strategies": ["baseline", "hg"]},
    },
}

JOBS = {"cpu": 2, "gpu": 12, "smoke": 2}  # gpu: tiny models leave an H100 idle between one run's kernels


def knobs_for(study: str, budget: str) -> Knobs:
    from scalevec.study.grids import get_study

    if budget not in BUDGETS:
        raise ConfigError(f"--budget: {budget!r} is not one of {', '.join(BUDGETS)}")
    k = Knobs(sizes=dict(LADDERS[budget]), base=list(BASE[budget]) + _compile(budget))
    for table in (BUDGETS[budget]["_all"], BUDGETS[budget][get_study(study).name]):
        for key, value in table.items():
            setattr(k, key, value)
    return k


def _compile(budget: str) -> list[str]:
    """CPU: compile every run (about twice the tokens/s of eager for two single-threaded runs) when inductor
    can build CPU kernels; the smoke budget stays eager (its runs are shorter than a compile)."""
    from scalevec.train.compiling import cpu_compiler_available

    return ["train.compile=true"] if budget == "cpu" and cpu_compiler_available() else []
