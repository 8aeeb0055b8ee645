"""A run directory as a unit: write one (for imports) and load a finished or running one (eval, sample, export).

Layout: ``config.toml`` (resolved), ``metrics.jsonl``, ``summary.json``, ``tokenizer/`` (when the data has
one) and ``checkpoints/step_XXXXXXXX/``.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from scalevec.config import Config, ConfigError, from_table
from scalevec.models import Decoder, build_model
from scalevec.ops import dnp_swiglu as kernel_ops
from scalevec.train.checkpoint import load_latest, save_checkpoint
from scalevec.typed_config import load_toml

TOKENIZER_DIR = "tokenizer"


@dataclass
class Run:
    path: Path
    cfg: Config
    model: Decoder
    step: int
    tokenizer: object | None


def load_run(run_dir: str | Path, device: str | torch.device = "cpu") -> Run:
    """The model of the newest valid checkpoint, its config and (if saved) its tokenizer."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.toml").is_file():
        raise ConfigError(f"{run_dir} is not a run directory (no config.toml)")
    cfg = from_table(load_toml(run_dir / "config.toml"))
    loaded = load_latest(run_dir)
    if loaded is None:
        raise ConfigError(f"{run_dir} has no checkpoint yet")
    for line in loaded.skipped:
        print(f"warning: {line}; using an older checkpoint", flush=True)
    model = build_model(cfg.model, cfg.scale)
    missing, unexpected = model.load_state_dict(loaded.model_state, strict=False)
    tied = {"head.weights.head"} if cfg.model.tie_embeddings else set()
    if set(missing) - tied or unexpected:
        raise ConfigError(f"{loaded.path} does not match its config.toml (missing {sorted(set(missing) - tied)[:3]},"
                          f" unexpected {sorted(unexpected)[:3]})")
    tok = None
    if (run_dir / TOKENIZER_DIR).is_dir():
        from scalevec.data import load_tokenizer

        tok = load_tokenizer(run_dir / TOKENIZER_DIR)
    model = model.to(device).eval()
    kernel_ops.enable(model)
    return Run(run_dir, cfg, model, loaded.state["step"], tok)


def save_tokenizer_files(src: Path | None, run_dir: Path) -> None:
    if src is None or not Path(src).is_dir():
        return
    dst = run_dir / TOKENIZER_DIR
    if dst.exists():
        return
    tmp = run_dir / (TOKENIZER_DIR + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp, ignore=shutil.ignore_patterns("*.bin"))
    tmp.rename(dst)


def write_run(run_dir: str | Path, cfg: Config, model: Decoder, tokenizer_dir: Path | None = None) -> Path:
    """A new run at step 0 holding ``model``'s weights; ``scalevec train --resume`` continues from it."""
    run_dir = Path(run_dir)
    if (run_dir / "config.toml").exists():
        raise ConfigError(f"{run_dir} already holds a run; choose another output folder")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.toml").write_text(cfg.to_toml())
    save_tokenizer_files(tokenizer_dir, run_dir)
    state = {"step": 0, "tokens": 0, "optimizer": None, "loader": None, "rng": torch.get_rng_state(),
             "wall_s": 0.0}
    sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    save_checkpoint(run_dir, 0, sd, state, keep=cfg.train.keep_ckpts)
    return run_dir
