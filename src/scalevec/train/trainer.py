"""The training loop: grad accumulation, clipping, autocast, eval on a fixed held-out set, metrics, checkpoints,
exact resume. Single process or torchrun (DDP / FSDP2)."""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from scalevec.config import Config, ConfigError, from_table
from scalevec.info import count_params
from scalevec.models import build_model
from scalevec.optim import build_optimizer, lr_factor, set_lr
from scalevec.roles import param_roles
from scalevec.train import distributed as D
from scalevec.train.checkpoint import CheckpointError, list_checkpoints, load_latest, save_checkpoint
from scalevec.train.run import save_tokenizer_files
from scalevec.typed_config import load_toml


class TrainingError(RuntimeError):
    """A run that must stop (divergence, a broken resume); one line naming the problem."""


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device: 'cuda' requested but no CUDA device is available")
    if name == "cuda" and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return torch.device(name)


def pad_vocab(n: int, multiple: int = 64) -> int:
    return (n + multiple - 1) // multiple * multiple


def resolve_vocab(cfg: Config, data_vocab: int) -> None:
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = pad_vocab(data_vocab)
    elif cfg.model.vocab_size < data_vocab:
        raise ConfigError(f"model.vocab_size: {cfg.model.vocab_size} is below the tokenizer's {data_vocab}")


def check_resume_config(run_dir: Path, cfg: Config) -> None:
    """A resume may change how long or how to train, never what is trained."""
    saved = from_table(load_toml(run_dir / "config.toml"))
    for section in ("model", "scale", "data"):
        a, b = getattr(saved, section), getattr(cfg, section)
        for key, va in vars(a).items():
            vb = getattr(b, key)
            if key == "vocab_size" and section == "model" and vb == 0:
                continue
            if va != vb:
                raise ConfigError(f"resume: {section}.{key} changed from {va!r} to {vb!r}; "
                                  "start a new run.out instead")


class Metrics:
    """``metrics.jsonl``: one JSON object per line; truncated to the resumed step so reruns never duplicate."""

    def __init__(self, path: Path, enabled: bool, resume_step: int | None):
        self.path, self.enabled = path, enabled
        if enabled and resume_step is not None and path.exists():
            keep = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln).get("step", 0) <= resume_step]
            path.write_text("".join(ln + "\n" for ln in keep))
        elif enabled:
            path.write_text("")

    def write(self, **row) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")


@dataclass
class Batches:
    loader: object
    eval_set: list


def _data(cfg: Config, info: D.DistInfo):
    from scalevec.data import TokenLoader, eval_batches, resolve_data

    if info.main:
        spec = resolve_data(cfg.data)
    D.barrier(info)
    if not info.main:
        spec = resolve_data(cfg.data)
    resolve_vocab(cfg, spec.vocab_size)
    t = cfg.train
    loader = TokenLoader(spec.train_files, t.batch_size, t.seq_len, seed=cfg.data.seed, rank=info.rank,
                         world_size=info.world_size, vocab_size=cfg.model.vocab_size)
    evals = eval_batches(spec.val_files, t.batch_size, t.seq_len, cfg.data.val_tokens,
                         vocab_size=cfg.model.vocab_size)
    return spec, Batches(loader, evals)


def _autocast(cfg: Config, device: torch.device):
    if cfg.train.precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate(model: nn.Module, batches: list, cfg: Config, device: torch.device) -> float:
    was = model.training
    model.eval()
    total = torch.zeros((), device=device)
    for x, y in batches:
        with _autocast(cfg, device):
            total += model(x.to(device), y.to(device)).float()
    model.train(was)
    return (total / max(1, len(batches))).item()


def _model_state(model: nn.Module, mode: str, info: D.DistInfo) -> dict:
    if info.enabled and mode == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def _optim_state(model, optimizer, mode: str, info: D.DistInfo) -> dict:
    if info.enabled and mode == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return {k: get_optimizer_state_dict(model, o, options=opts) for k, o in optimizer.optimizers.items()}
    return optimizer.state_dict()


def _load_states(model, optimizer, model_state, optim_state, mode: str, info: D.DistInfo) -> None:
    if info.enabled and mode == "fsdp":
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)

        opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=False)
        set_model_state_dict(model, model_state, options=opts)
        for k, o in optimizer.optimizers.items():
            set_optimizer_state_dict(model, o, optim_state[k], options=opts)
        return
    missing, unexpected = model.load_state_dict(model_state, strict=False)
    tied = {"head.weights.head"} if model.cfg.tie_embeddings else set()
    if set(missing) - tied or unexpected:
        raise CheckpointError(f"checkpoint does not match the model: missing {sorted(set(missing) - tied)[:3]}, "
                              f"unexpected {sorted(unexpected)[:3]}")
    if optim_state is not None:  # None: an imported model, the optimizer starts fresh
        optimizer.load_state_dict(optim_state)


def _group_grad_norms(optimizer) -> dict[str, float]:
    out = {}
    for g in optimizer.param_groups:
        grads = [p.grad for p in g["params"] if p.grad is not None]
        if grads:
            out[g["role"]] = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(x.float())
                                                                   for x in grads])).item()
    return out


def train(cfg: Config, resume: bool = False) -> dict:
    """Train per ``cfg``; returns the summary (also written to ``RUN_DIR/summary.json``)."""
    t = cfg.train
    if t.threads:
        torch.set_num_threads(t.threads)
    device = pick_device(t.device)
    info = D.init(device)
    run_dir = Path(cfg.run.out)
    try:
        return _train(cfg, resume, device, info, run_dir)
    finally:
        D.cleanup(info)


def _prepare_run_dir(cfg: Config, run_dir: Path, resume: bool, info: D.DistInfo) -> None:
    has_run = (run_dir / "config.toml").exists() or bool(list_checkpoints(run_dir))
    if resume:
        if not (run_dir / "config.toml").exists():
            raise ConfigError(f"--resume: {run_dir} holds no run (no config.toml)")
        check_resume_config(run_dir, cfg)
    elif has_run:
        raise ConfigError(f"run.out: {run_dir} already holds a run; pass --resume to continue it or choose "
                          "another run.out")
    D.barrier(info)  # every rank has checked before the main rank writes
    if info.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.toml").write_text(cfg.to_toml())
    D.barrier(info)


def _train(cfg: Config, resume: bool, device: torch.device, info: D.DistInfo, run_dir: Path) -> dict:
    t = cfg.train
    spec, batches = _data(cfg, info)
    _prepare_run_dir(cfg, run_dir, resume, info)
    if info.main:
        save_tokenizer_files(spec.tokenizer_dir, run_dir)

    torch.manual_seed(t.seed)
    model = build_model(cfg.model, cfg.scale).to(device)
    roles = param_roles(model)
    counts = count_params(model)
    wrapped = D.wrap(model, cfg.dist.mode, info, device)
    optimizer = build_optimizer(wrapped, cfg.optim, cfg.scale.weight_decay, roles)
    step_fn = torch.compile(wrapped) if t.compile else wrapped
    hooks = [m for m in model.modules() if hasattr(m, "after_optimizer_step")]
    eval_hooks = [m for m in model.modules() if hasattr(m, "eval_metrics")]

    start, tokens, wall_prev, skipped_steps = 0, 0, 0.0, 0
    if resume:
        loaded = load_latest(run_dir)
        if loaded is not None:
            for line in loaded.skipped:
                print(f"warning: {line}; falling back to an older checkpoint", flush=True)
            st = loaded.state
            _load_states(wrapped if cfg.dist.mode == "fsdp" else model, optimizer, loaded.model_state, st["optimizer"], cfg.dist.mode, info)
            if st["loader"] is not None:  # None: an imported model at step 0, data starts fresh
                batches.loader.load_state_dict(st["loader"][info.rank] if isinstance(st["loader"], list)
                                               else st["loader"])
            torch.set_rng_state(st["rng"])
            start, tokens, wall_prev = st["step"], st["tokens"], st["wall_s"]
            skipped_steps = st.get("skipped_steps", 0)
            if info.main:
                print(f"resumed from {loaded.path} at step {start}", flush=True)
    metrics = Metrics(run_dir / "metrics.jsonl", info.main, start if resume else None)

    tokens_per_step = t.batch_size * t.seq_len * t.grad_accum * info.world_size
    progress = None
    if info.main and t.progress:
        from tqdm import tqdm

        progress = tqdm(total=t.steps, initial=start, desc=run_dir.name, dynamic_ncols=True)

    def checkpoint(step: int) -> None:
        loader_states = [batches.loader.state_dict()]
        if info.enabled:
            gathered: list = [None] * info.world_size
            torch.distributed.all_gather_object(gathered, batches.loader.state_dict())
            loader_states = gathered
        mstate = _model_state(wrapped if cfg.dist.mode == "fsdp" else model, cfg.dist.mode, info)
        ostate = _optim_state(wrapped, optimizer, cfg.dist.mode, info)
        if info.main:
            state = {"step": step, "tokens": tokens, "optimizer": ostate, "rng": torch.get_rng_state(),
                     "loader": loader_states if info.enabled else loader_states[0],
                     "wall_s": wall_prev + time.perf_counter() - t0, "skipped_steps": skipped_steps}
            save_checkpoint(run_dir, step, mstate, state, t.keep_ckpts)
        D.barrier(info)

    t0 = time.perf_counter()
    tick, tick_tokens = time.perf_counter(), 0
    val_loss = math.nan
    wrapped.train()
    for step in range(start, t.steps):
        lr = lr_factor(step, t.steps, cfg.schedule)
        set_lr(optimizer, lr, cfg.optim)
        loss_sum = torch.zeros((), device=device)
        for micro in range(t.grad_accum):
            x, y = batches.loader.next_batch()
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            sync = contextlib.nullcontext()
            if info.enabled and cfg.dist.mode == "ddp" and micro < t.grad_accum - 1:
                sync = wrapped.no_sync()
            with sync, _autocast(cfg, device):
                loss = step_fn(x, y)
                aux = model.aux_loss()
                total = loss if aux is None else loss + aux
            (total / t.grad_accum).backward()
            loss_sum += loss.detach().float()
        clip = cfg.optim.grad_clip or float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(wrapped.parameters(), clip)
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        train_loss = D.all_reduce_mean(loss_sum / t.grad_accum, info)
        finite = bool(torch.isfinite(train_loss) and torch.isfinite(grad_norm))
        if not finite:
            groups = _group_grad_norms(optimizer)
            bad = [k for k, v in groups.items() if not math.isfinite(v)] or ["none (the loss itself)"]
            if t.on_nonfinite == "stop":
                if progress:
                    progress.close()
                raise TrainingError(
                    f"non-finite {'loss' if not torch.isfinite(train_loss) else 'gradient'} at step {step}: "
                    f"loss={train_loss.item():.4g}, grad_norm={grad_norm.item():.4g}; groups with non-finite "
                    f"gradient norm: {', '.join(bad)}; the last good checkpoint is kept in {run_dir}"
                )
            skipped_steps += 1
            optimizer.zero_grad(set_to_none=True)
        else:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            for m in hooks:
                m.after_optimizer_step()
        tokens += tokens_per_step
        tick_tokens += tokens_per_step
        done = step + 1
        if done % t.log_every == 0 or done == t.steps:
            now = time.perf_counter()
            tps = tick_tokens / max(now - tick, 1e-9)
            tick, tick_tokens = now, 0
            row = dict(step=done, tokens=tokens, train_loss=train_loss.item(), lr=lr * cfg.optim.lr,
                       lr_factor=lr, grad_norm=grad_norm.item(), tok_per_s=tps)
            if skipped_steps:
                row["skipped_steps"] = skipped_steps
            aux = model.aux_loss()
            if aux is not None:
                row["aux_loss"] = aux.item()
            metrics.write(**row)
            if progress:
                progress.set_postfix(loss=f"{row['train_loss']:.3f}", tok_s=f"{tps:,.0f}", refresh=False)
        if progress:
            progress.update(1)
        if (t.eval_every and done % t.eval_every == 0) or done == t.steps:
            val_loss = evaluate(step_fn, batches.eval_set, cfg, device)
            row = dict(step=done, tokens=tokens, val_loss=val_loss)
            for m in eval_hooks:
                row.update(m.eval_metrics())
            metrics.write(**row)
            if progress:
                progress.write(f"step {done}: val_loss {val_loss:.4f}")
        if (t.ckpt_every and done % t.ckpt_every == 0) or done == t.steps:
            checkpoint(done)
    if progress:
        progress.close()
    if start >= t.steps:  # nothing left to do: report the stored final evaluation
        val_loss = evaluate(step_fn, batches.eval_set, cfg, device)
    wall = wall_prev + time.perf_counter() - t0
    summary = {
        "final_val_loss": val_loss, "params": counts["total"], "non_embedding_params": counts["non_embedding"],
        "scale_vector_params": counts["scale_vector"], "scale_vector_share": counts["scale_vector_share"],
        "tokens": tokens, "steps": t.steps, "wall_s": wall, "tok_per_s": tokens / max(wall, 1e-9),
        "strategy": cfg.scale.strategy, "model": cfg.model.preset, "optimizer": cfg.optim.name,
        "schedule": cfg.schedule.name, "world_size": info.world_size, "skipped_steps": skipped_steps,
        "device": str(device),
    }
    for k in ("active", "active_non_embedding"):
        if k in counts:
            summary[f"{k}_params"] = counts[k]
    if info.main:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary
