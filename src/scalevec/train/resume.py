"""Resuming a run: what it may change, loading its checkpoint, and what it says when it changes the run's length."""

from __future__ import annotations

import shlex
from pathlib import Path

import torch
from torch import nn

import scalevec.train.distributed as D
from scalevec.config import Config, ConfigError, from_table
from scalevec.fileio import atomic_write_text
from scalevec.optim import decay_start, lr_factor
from scalevec.train.checkpoint import (
    list_checkpoints,
    load_latest,
    load_step,
    remove_stale,
    set_aside,
    step_of,
    supersede,
)
from scalevec.train.state import load_states
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
            if key == "vocab_size" and section == "data" and (b.tokenizer != "bpe" or b.train_bin):
                continue  # recorded from the tokenizer rather than chosen: the data itself is checked
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
    if trained_for == total or start >= total or start == 0:  # step 0 (an import): no schedule was followed
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


def load_for_resume(run_dir: Path, cfg: Config, model: nn.Module, optimizer, loader, info: D.DistInfo,
                    from_step: int | None):
    """Load the newest valid checkpoint (or that of ``from_step``) into the model, optimizer, loader and RNG.

    None when there is none yet (a run killed before its first checkpoint starts over). Writes nothing: a
    resume that does not fit is refused before the run folder is touched.
    """
    loaded = load_latest(run_dir) if from_step is None else load_step(run_dir, from_step)
    if loaded is None:
        return None
    st = loaded.state
    try:
        load_states(model, optimizer, loaded.model_state, st["optimizer"], cfg.dist.mode, info)
        if st["loader"] is not None:  # None: an imported model at step 0, data starts fresh
            pos = st["loader"]
            loader.load_state_dict(pos[info.rank] if isinstance(pos, list) else pos)
    except (ValueError, KeyError, RuntimeError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"resume: {loaded.path} does not fit this config ({reason}); resume with the saved "
                          "config or start a new run.out") from e
    torch.set_rng_state(st["rng"])
    return loaded


def announce_resume(run_dir: Path, loaded, saved: Config | None, cfg: Config, from_step: int | None) -> None:
    """Main rank: tidy the folder for the resumed run and say what it continues."""
    start = loaded.state["step"] if loaded else 0
    for line, ckpt in zip(loaded.skipped if loaded else [], loaded.corrupt if loaded else [], strict=True):
        aside = set_aside(ckpt)
        print(f"warning: {line}; set aside as {aside.name}; falling back to {loaded.path.name}", flush=True)
    if n := remove_stale(run_dir):
        print(f"removed {n} temporary checkpoint folder(s) left by a crash", flush=True)
    if from_step is not None and (newer := supersede(run_dir, start)):
        print(f"set aside {len(newer)} newer checkpoint(s) as superseded_step_*: the run continues from step "
              f"{start}", flush=True)
    atomic_write_text(run_dir / "config.toml", cfg.to_toml())
    print(f"resumed from {loaded.path} at step {start}" if loaded else
          f"no checkpoint in {run_dir} yet: starting from step 0", flush=True)
    if loaded and saved is not None:
        note = schedule_note(run_dir, saved, cfg, start, loaded.state.get("total_steps", saved.train.steps))
        if note:
            print(note, flush=True)
