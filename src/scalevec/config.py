"""The run config: typed sections, TOML files under ``configs/`` plus ``key=value`` overrides."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from scalevec.models.config import ModelConfig
from scalevec.strategy import ScaleConfig
from scalevec.typed_config import ConfigError, load_toml, merge_tables, overrides_to_table, to_table, update


@dataclass
class DataConfig:
    source: str = "shakespeare"  # "shakespeare" (embedded default corpus), a text file, a folder, or a .jsonl
    tokenizer: str = "bpe"  # bpe (trained on the train split) | gpt2 | byte | path to a tokenizer.json
    # bpe: the vocabulary to train; a run records the tokenizer's actual one here (other tokenizers, or a BPE
    # that ran out of merges on a small corpus).
    vocab_size: int = 4096
    dir: str = ""  # prepared shards; default: a folder under the cache named by source and tokenizer
    train_bin: str = ""  # glob of existing nanoGPT-format train shards (skips prepare), e.g. fineweb_train_*.bin
    val_bin: str = ""  # glob of existing validation shards
    val_fraction: float = 0.1  # share of documents held out when the source has no natural split
    on_bad_utf8: Literal["replace", "error"] = "replace"
    seed: int = 0  # data order
    val_tokens: int = 65536  # size of the fixed held-out evaluation set (tokens)


@dataclass
class OptimConfig:
    name: Literal["adamw", "muon"] = "adamw"
    lr: float = 3e-3  # peak LR of AdamW groups (and of Muon matrices unless muon_lr is set)
    muon_lr: float = 0.02
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    momentum: float = 0.95  # Muon
    grad_clip: float = 1.0  # 0 disables
    # Per-role LR multipliers, e.g. {input_scale = 2.0, embedding = 0.5}
    lr_mult: dict[str, float] = field(default_factory=dict)


@dataclass
class ScheduleConfig:
    name: Literal["cosine", "wsd", "constant", "linear"] = "cosine"
    warmup: float = 0.05  # fraction of steps (< 1) or a step count (>= 1)
    min_lr_ratio: float = 0.1  # final LR / peak LR for cosine, linear and WSD
    decay_fraction: float = 0.2  # WSD: share of steps in the decay phase
    decay_shape: Literal["linear", "cosine", "1-sqrt"] = "linear"  # WSD decay phase


@dataclass
class TrainConfig:
    steps: int = 300
    batch_size: int = 16  # sequences per micro-batch per process
    seq_len: int = 128
    grad_accum: int = 1
    seed: int = 0  # model init
    precision: Literal["fp32", "bf16"] = "bf16"  # autocast dtype on CPU and CUDA
    # torch.compile the model: true, false, or "auto" = on for runs of at least COMPILE_AUTO_MIN_STEPS steps
    # when a compiler backend is present (docs/performance.md: the cold compile pays back within that length).
    compile: bool | Literal["auto"] = "auto"
    eval_every: int = 50
    log_every: int = 10
    ckpt_every: int = 100  # 0: only at the end
    keep_ckpts: int = 2
    # WSD: also keep the checkpoint where the decay starts (never pruned): a longer run continues from it
    # with ``--resume RUN --from-step N``, stretching the stable phase.
    keep_predecay: bool = True
    device: str = "auto"  # auto | cpu | cuda
    threads: int = 0  # torch CPU threads (0: torch's default)
    on_nonfinite: Literal["stop", "skip"] = "stop"
    progress: bool = True
    scale_stats: bool = True  # γ statistics per site at every evaluation (metrics.jsonl "gamma/..." keys)
    tensorboard: bool = False  # also log every metric to <run.out>/tensorboard (needs the "tb" extra)


@dataclass
class DistConfig:
    mode: Literal["ddp", "fsdp"] = "ddp"


@dataclass
class RunConfig:
    out: str = "runs/default"
    name: str = ""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    scale: ScaleConfig = field(default_factory=ScaleConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def validate(self) -> Config:
        t, o = self.train, self.optim
        checks = [
            (t.steps > 0, "train.steps", f"must be positive, got {t.steps}"),
            (t.batch_size > 0, "train.batch_size", f"must be positive, got {t.batch_size}"),
            (t.seq_len > 0, "train.seq_len", f"must be positive, got {t.seq_len}"),
            (t.grad_accum > 0, "train.grad_accum", f"must be positive, got {t.grad_accum}"),
            (t.eval_every >= 0, "train.eval_every", f"must be >= 0, got {t.eval_every}"),
            (t.log_every >= 1, "train.log_every", f"must be >= 1, got {t.log_every}"),
            (t.ckpt_every >= 0, "train.ckpt_every", f"must be >= 0 (0: only at the end), got {t.ckpt_every}"),
            (t.keep_ckpts >= 1, "train.keep_ckpts", f"must be >= 1, got {t.keep_ckpts}"),
            (t.threads >= 0, "train.threads", f"must be >= 0 (0: torch's default), got {t.threads}"),
            (0 < o.lr < math.inf, "optim.lr", f"must be positive and finite, got {o.lr}"),
            (0 < o.muon_lr < math.inf, "optim.muon_lr", f"must be positive and finite, got {o.muon_lr}"),
            (all(0 <= b < 1 for b in o.betas), "optim.betas", f"must each be in [0, 1), got {o.betas}"),
            (o.eps > 0, "optim.eps", f"must be positive, got {o.eps}"),
            (0 <= o.momentum < 1, "optim.momentum", f"must be in [0, 1), got {o.momentum}"),
            (0 <= o.weight_decay < math.inf, "optim.weight_decay",
             f"must be >= 0 and finite, got {o.weight_decay}"),
            (0 <= o.grad_clip < math.inf, "optim.grad_clip", f"must be >= 0 and finite, got {o.grad_clip}"),
            (0 <= self.schedule.min_lr_ratio <= 1, "schedule.min_lr_ratio", "must be in [0, 1]"),
            (0 <= self.schedule.decay_fraction <= 1, "schedule.decay_fraction", "must be in [0, 1]"),
            (0 <= self.schedule.warmup < math.inf, "schedule.warmup", "must be >= 0 and finite"),
            (0 < self.data.val_fraction < 1, "data.val_fraction", "must be in (0, 1)"),
            (self.data.val_tokens >= 1, "data.val_tokens", f"must be positive, got {self.data.val_tokens}"),
            (self.data.vocab_size >= 257 or self.data.tokenizer != "bpe", "data.vocab_size",
             "must be at least 257 for a BPE (bytes plus end-of-text)"),
        ]
        for ok, key, msg in checks:
            if not ok:
                raise ConfigError(f"{key}: {msg}")
        from scalevec.roles import ROLE_NAMES

        for k in o.lr_mult:
            if k not in ROLE_NAMES:
                raise ConfigError(f"optim.lr_mult.{k}: unknown role; roles are {', '.join(ROLE_NAMES)}")
        self.model.validate()
        self.scale.validate()
        return self

    def to_toml(self) -> str:
        import tomli_w  # only writing needs it: reading configs (and a GPU image without it) does not

        return tomli_w.dumps(to_table(self))

    def table(self) -> dict[str, Any]:
        return to_table(self)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then a TOML file, then ``key=value`` overrides; validated."""
    table: dict[str, Any] = load_toml(path) if path else {}
    table = merge_tables(table, overrides_to_table(overrides or []))
    # The model preset and the scale strategy are applied before their explicit fields.
    cfg = Config()
    update(cfg, table)
    return cfg.validate()


def from_table(table: dict[str, Any]) -> Config:
    cfg = Config()
    update(cfg, table)
    return cfg.validate()


__all__ = ["Config", "ConfigError", "DataConfig", "OptimConfig", "ScheduleConfig", "TrainConfig", "load_config"]
