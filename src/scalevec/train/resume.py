"""What a resume may change, and what it says when it changes the length of the run."""

from __future__ import annotations

import shlex
from pathlib import Path

from scalevec.config import Config, ConfigError, from_table
from scalevec.optim import decay_start, lr_factor
from scalevec.train.checkpoint import list_checkpoints, step_of
from scalevec.typed_config import load_toml


def saved_config(run_dir: Path) -> Config:
    return from_table(load_toml(run_dir / "config.toml"))


def check_resume_config(saved: Config, cfg: Config) -> None:
    """A resume may change how long or how to train, never what is trained."""
    for section in ("model", "scale", "data"):
        a, b = getattr(saved, section), getattr(cfg, section)
        for key, va in vars(a).items():
            vb = getattr(b, key)
            if key == "vocab_size" and section == "model" and vb == 0:
                continue
            if va != vb:
                raise ConfigError(f"resume: {section}.{key} changed from {va!r} to {vb!r}; "
                                  "start a new run.out instead")


def schedule_note(run_dir: Path, saved: Config, cfg: Config, start: int, trained_for: int) -> str | None:
    """One line when a resume changes ``train.steps``: how the schedule is recomputed and where the LR goes.

    ``trained_for`` is the length of the schedule the checkpoint of ``start`` was trained under. For WSD the
    line also names the way to extend without raising the LR after its decay: continue from the last
    checkpoint before the decay (``--from-step``), whose stable phase the longer schedule simply stretches.
    """
    total, sched = cfg.train.steps, cfg.schedule
    if trained_for == total or start >= total:
        return None
    old_step = min(start, trained_for - 1)  # past the end of the old schedule: the LR it ended at
    old_lr = lr_factor(old_step, trained_for, saved.schedule) * saved.optim.lr
    new_lr = lr_factor(start, total, sched) * cfg.optim.lr
    where = "where it ended" if start >= trained_for else f"step {start + 1} of the {trained_for}-step schedule"
    change = "stays at" if f"{old_lr:.2e}" == f"{new_lr:.2e}" else f"goes from {old_lr:.2e} ({where}) to"
    line = (f"schedule: train.steps {trained_for} -> {total}: {sched.name} recomputed for {total} steps; "
            f"the LR of step {start + 1} {change} {new_lr:.2e}")
    if sched.name == "wsd":
        line += f" (decay over steps {decay_start(total, sched) + 1}-{total})"
        old_decay = decay_start(trained_for, saved.schedule)
        if saved.schedule.name == "wsd" and start > old_decay and new_lr > old_lr:
            before = [step_of(c) for c in list_checkpoints(run_dir) if step_of(c) <= old_decay]
            cmd = f"scalevec train --resume {shlex.quote(str(run_dir))} --from-step"
            line += ("; to stretch the stable phase instead, continue from before the decay: "
                     f"{cmd} {before[-1]} train.steps={total}" if before else
                     f"; no checkpoint from before the decay (step {old_decay}) is kept to stretch from")
    return line
