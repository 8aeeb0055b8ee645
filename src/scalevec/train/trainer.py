"""The training loop: grad accumulation, clipping, autocast, eval on a fixed held-out set, metrics,
checkpoints, exact resume. Single process or torchrun (DDP / FSDP2). docs/reliability.md: what survives which
fault."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shlex
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from scalevec import cpu_kernels
from scalevec.config import Config, ConfigError
from scalevec.fileio import atomic_write_text
from scalevec.info import count_params
from scalevec.models import build_model
from scalevec.optim import build_optimizer, decay_start, lr_factor, set_lr
from scalevec.roles import param_roles
from scalevec.scale import scale_statistics
from scalevec.train import distributed as D
from scalevec.train.checkpoint import (
    CheckpointError,
    injected_fault,
    list_checkpoints,
    save_checkpoint,
)
from scalevec.train.compiling import compile_model
from scalevec.train.errors import TrainingError, TrainingStopped
from scalevec.train.mfu import flops_per_token
from scalevec.train.nonfinite import NonfiniteWatch, nonfinite_groups, param_labels
from scalevec.train.progress import Metrics, Progress
from scalevec.train.resume import announce_resume, check_resume_config, load_for_resume, saved_config
from scalevec.train.run import save_tokenizer_files
from scalevec.train.signals import StopSignal
from scalevec.train.state import model_state, optim_state

__all__ = ["TrainingError", "TrainingStopped", "evaluate", "pick_device", "train"]

# Above this many passes over the training data a run says so: its validation loss mostly measures memorising.
EPOCH_WARNING = 4


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
    """Fill ``model.vocab_size`` from the tokenizer, and record the tokenizer's vocabulary in ``data.vocab_size``
    wherever the key did not set it (another tokenizer, existing shards, a BPE that ran out of merges), so that
    a run's config.toml says what was used. A BPE short of its target is the same BPE asked for that size."""
    d = cfg.data
    if d.train_bin or d.tokenizer != "bpe" or data_vocab < d.vocab_size:
        d.vocab_size = data_vocab
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = pad_vocab(data_vocab)
    elif cfg.model.vocab_size < data_vocab:
        raise ConfigError(f"model.vocab_size: {cfg.model.vocab_size} is below the tokenizer's {data_vocab}")


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
    asked = cfg.data.vocab_size if cfg.data.tokenizer == "bpe" and not cfg.data.train_bin else None
    resolve_vocab(cfg, spec.vocab_size)
    t = cfg.train
    # Ids are checked against the tokenizer's vocabulary, not the padded embedding: an id in the padding
    # would train silently on rows no tokenizer ever emits.
    loader = TokenLoader(spec.train_files, t.batch_size, t.seq_len, seed=cfg.data.seed, rank=info.rank,
                         world_size=info.world_size, vocab_size=spec.vocab_size)
    evals = eval_batches(spec.val_files, t.batch_size, t.seq_len, cfg.data.val_tokens,
                         vocab_size=spec.vocab_size)
    short = f" (the BPE ran out of merges short of the {asked:,} asked for)" if asked and asked > spec.vocab_size \
        else ""
    return spec, Batches(loader, evals), short


def data_report(cfg: Config, loader, world_size: int, vocab_note: str = "") -> list[str]:
    """The line a run prints before training (corpus, global batch, epochs), and a warning if it repeats the
    data more than EPOCH_WARNING times."""
    t = cfg.train
    seqs = t.batch_size * world_size * t.grad_accum
    epochs = t.steps * t.grad_accum / loader.steps_per_epoch
    ranks = f"{world_size} rank{'s' if world_size > 1 else ''}"
    lines = [f"data: {loader.stream.n_tokens:,} training tokens, vocabulary {cfg.data.vocab_size:,}{vocab_note}; "
             + f"global batch {seqs} sequences ({t.batch_size} per rank x {ranks} x {t.grad_accum} accumulation) "
             + f"of {t.seq_len} tokens = {seqs * t.seq_len:,} tokens per step; {t.steps} steps take {epochs:.3g} "
             + "epochs"]
    if epochs > EPOCH_WARNING:
        lines.append(f"warning: {t.steps} steps take {epochs:.1f} epochs of the training data (more than "
                     f"{EPOCH_WARNING}): validation loss will mostly measure memorisation; add data or lower "
                     "train.steps")
    return lines


# Runs at least this long compile under train.compile="auto". Measured at tiny on 2 CPU cores: a cold compile
# (33-52 s) pays back after 320-580 steps; with inductor's on-disk cache warm it takes ~7 s (docs/performance.md).
COMPILE_AUTO_MIN_STEPS = 500


def use_compile(setting: bool | str, steps: int, device: torch.device) -> bool:
    """Resolve ``train.compile``: "auto" compiles long runs, and only where a backend can build kernels (a C++
    compiler and Python's headers for inductor's CPU code; CUDA builds ship Triton). ``true`` where CPU kernels
    cannot be built is refused with one line instead of failing inside the first step."""
    if setting != "auto":
        if setting and device.type == "cpu" and not cpu_compiler_available():
            raise ConfigError("train.compile=true: torch.compile on CPU needs a C++ compiler (g++, clang++ or $CXX) "
                              "and Python's headers (Python.h), and this machine lacks one; install them or set "
                              "train.compile=false")
        return bool(setting)
    if steps < COMPILE_AUTO_MIN_STEPS:
        return False
    return device.type == "cuda" or cpu_compiler_available()


def cpu_compiler_available() -> bool:
    """Inductor builds each CPU kernel as a Python extension module: it needs a C++ compiler and Python.h."""
    import shutil
    import sysconfig

    compiler = any(shutil.which(c) for c in (os.environ.get("CXX", ""), "g++", "c++", "clang++") if c)
    return compiler and Path(sysconfig.get_paths()["include"], "Python.h").is_file()


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


def nonfinite_line(step: int, loss: float, norm: float, groups: list[str]) -> str:
    what = "loss" if not math.isfinite(loss) else "gradient"
    return (f"non-finite {what} at step {step} (loss {loss:.4g}, grad norm {norm:.4g}); groups with a non-finite "
            f"gradient norm: {'; '.join(groups)}")


def _poison_grad(optimizer, role: str) -> None:
    """Test-only fault (``SCALEVEC_FAULT=nan_grad:STEP[:ROLE]``): a NaN in one gradient of group ``role``."""
    for g in optimizer.param_groups:
        if role in ("", g["role"]):
            for p in g["params"]:
                if p.grad is not None:
                    p.grad.view(-1)[0] = math.nan
                    return
    raise TrainingError(f"SCALEVEC_FAULT nan_grad: no gradient in a group named {role!r}")


def train(cfg: Config, resume: bool = False, from_step: int | None = None) -> dict:
    """Train per ``cfg``; returns the summary (also written to ``RUN_DIR/summary.json``). ``from_step``: resume
    from that checkpoint instead of the newest (the newer ones are set aside as ``superseded_step_*``)."""
    t = cfg.train
    if t.threads:
        torch.set_num_threads(t.threads)
    device = pick_device(t.device)
    if device.type == "cuda":  # fp32 matmuls (fp32 runs, autocast's fp32 ops) on TF32 tensor cores
        torch.set_float32_matmul_precision("high")
    info = D.init(device)
    run_dir = Path(cfg.run.out)
    try:
        with StopSignal() as stop:
            summary = _train(cfg, resume, from_step, device, info, run_dir, stop)
    except BaseException:
        D.cleanup(info, finished=False)
        raise
    D.cleanup(info)
    return summary


def _prepare_run_dir(cfg: Config, run_dir: Path, resume: bool, info: D.DistInfo) -> Config | None:
    """Check the folder before anything is written; on a resume, the saved config it continues."""
    has_run = (run_dir / "config.toml").exists() or bool(list_checkpoints(run_dir))
    saved = None
    if resume:
        if not (run_dir / "config.toml").exists():
            raise ConfigError(f"--resume: {run_dir} holds no run (no config.toml)")
        saved = saved_config(run_dir)
        check_resume_config(saved, cfg)
    elif has_run:
        raise ConfigError(f"run.out: {run_dir} already holds a run; pass --resume to continue it or choose "
                          "another run.out")
    D.barrier(info)  # every rank has checked before the main rank writes
    if info.main and not resume:  # a resume rewrites config.toml once its checkpoint has loaded
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.toml", cfg.to_toml())
    D.barrier(info)
    return saved


def _train(cfg: Config, resume: bool, from_step: int | None, device: torch.device, info: D.DistInfo,
           run_dir: Path, stop: StopSignal) -> dict:
    t = cfg.train
    spec, batches, vocab_note = _data(cfg, info)
    compiled = use_compile(t.compile, t.steps, device)  # refuses an impossible compile before the folder is touched
    saved_cfg = _prepare_run_dir(cfg, run_dir, resume, info)
    if info.main:
        save_tokenizer_files(spec.tokenizer_dir, run_dir)

    torch.manual_seed(t.seed)
    model = build_model(cfg.model, cfg.scale).to(device)
    cpu_kernels.enable(model)  # on CPU, DNP's kernel: built here rather than inside a traced forward
    roles = param_roles(model)
    counts = count_params(model)
    wrapped = D.wrap(model, cfg.dist.mode, info, device)
    optimizer = build_optimizer(wrapped, cfg.optim, cfg.scale.weight_decay, roles)
    step_fn = compile_model(wrapped) if compiled else wrapped
    hooks = [m for m in model.modules() if hasattr(m, "after_optimizer_step")]
    # Kept: walking the module tree every step costs 3-5 µs per parameter on CPU (docs/performance.md).
    trainable = [p for p in wrapped.parameters() if p.requires_grad]
    eval_hooks = [m for m in model.modules() if hasattr(m, "eval_metrics")]

    start, tokens, wall_prev, skipped_steps = 0, 0, 0.0, 0
    if resume:
        target = wrapped if cfg.dist.mode == "fsdp" else model
        loaded = load_for_resume(run_dir, cfg, target, optimizer, batches.loader, info, from_step)
        D.barrier(info)  # every rank has loaded before the main rank changes the run folder
        if loaded is not None:
            st = loaded.state
            start, tokens, wall_prev = st["step"], st["tokens"], st["wall_s"]
            skipped_steps = st.get("skipped_steps", 0)
        if info.main:
            announce_resume(run_dir, loaded, saved_cfg, cfg, from_step)
        D.barrier(info)  # superseded checkpoints are gone before any rank saves
    if info.main:
        for line in data_report(cfg, batches.loader, info.world_size, vocab_note):
            print(line, flush=True)
    metrics = Metrics(run_dir / "metrics.jsonl", info.main, start if resume else None,
                      run_dir / "tensorboard" if t.tensorboard else None)
    # Under FSDP the gains are shards; their statistics would need a gather per vector at every evaluation.
    gamma_stats = t.scale_stats and cfg.dist.mode != "fsdp"
    # WSD: the last checkpoint at the peak LR is kept (pinned), the point a longer schedule continues from.
    predecay = decay_start(t.steps, cfg.schedule) if cfg.schedule.name == "wsd" and t.keep_predecay else -1

    tokens_per_step = t.batch_size * t.seq_len * t.grad_accum * info.world_size
    progress = Progress(info.main and t.progress, t.steps, start, run_dir.name)

    def checkpoint(step: int) -> None:
        loader_states = [batches.loader.state_dict()]
        if info.enabled:
            gathered: list = [None] * info.world_size
            torch.distributed.all_gather_object(gathered, batches.loader.state_dict())
            loader_states = gathered
        mstate = model_state(wrapped if cfg.dist.mode == "fsdp" else model, cfg.dist.mode, info)
        ostate = optim_state(wrapped, optimizer, cfg.dist.mode, info)
        if info.main:
            state = {"step": step, "tokens": tokens, "optimizer": ostate, "rng": torch.get_rng_state(),
                     "loader": loader_states if info.enabled else loader_states[0],
                     "wall_s": wall_prev + time.perf_counter() - t0, "skipped_steps": skipped_steps,
                     "total_steps": t.steps}
            save_checkpoint(run_dir, step, mstate, state, t.keep_ckpts, pinned=step == predecay)
        D.barrier(info)

    def close() -> None:
        progress.close()
        metrics.close()

    # A run that stops on a non-finite step needs no per-step host read to find it (FSDP shards the gradients
    # whose names the diagnosis needs, so it reads every step, as skip mode must).
    labels = param_labels(model, roles, trainable)
    watch = None
    if t.on_nonfinite == "stop" and not (info.enabled and cfg.dist.mode == "fsdp"):
        watch = NonfiniteWatch(trainable, labels, device)

    def params_with_grad() -> list:
        return [p for p in trainable if p.grad is not None]

    def update(params: list, grad_norm: torch.Tensor) -> None:
        # clip_grad_norm_ split in two: clipping with a non-finite norm would smear NaN over every gradient
        # and hide which groups diverged.
        if cfg.optim.grad_clip:
            torch.nn.utils.clip_grads_with_norm_(params, cfg.optim.grad_clip, grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        for m in hooks:
            m.after_optimizer_step()

    def diverged(step: int, loss: float, norm: float, groups: list[str]) -> TrainingError:
        close()
        kept = list_checkpoints(run_dir)
        kept_msg = f"the last good checkpoint {kept[-1]} is kept" if kept else "no checkpoint yet"
        return TrainingError(f"{nonfinite_line(step, loss, norm, groups)}; {kept_msg}; train.on_nonfinite=skip "
                             "skips such steps instead")

    def check_finite() -> None:
        found = watch.first() if watch is not None else None
        if found is not None:
            step, loss, norm, groups = found
            raise diverged(step, loss, norm, groups or ["none"])

    def stop_requested(at_sync: bool) -> bool:
        """Single process: the flag. Across ranks: agreed (any rank's signal) at logged or saved steps, so that
        every rank stops after the same step without a collective and a read every step."""
        if not info.enabled:
            return stop.requested
        if not at_sync:
            return False
        votes = torch.full((), float(stop.requested), device=device)
        return D.all_reduce_sum(votes, info).item() > 0

    # Test-only faults (docs/reliability.md): step numbers as in metrics.jsonl, -1 when unset.
    nan_fault, inf_fault = injected_fault("nan_grad"), injected_fault("inf_loss")
    nan_step, nan_role = nan_fault or (-1, "")
    inf_step = inf_fault[0] if inf_fault else -1

    t0 = time.perf_counter()
    tick, tick_tokens = time.perf_counter(), 0
    val_loss = math.nan
    wrapped.train()
    try:
        for step in range(start, t.steps):
            done = step + 1  # the step number of metrics rows and checkpoints: updates applied after this one
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
                    if done == inf_step:
                        loss = loss * math.inf
                    aux = model.aux_loss()
                    total = loss if aux is None else loss + aux
                (total / t.grad_accum).backward()
                loss_sum += loss.detach().float()
            if done == nan_step:
                _poison_grad(optimizer, nan_role)
            reduced = D.all_reduce_mean(loss_sum / t.grad_accum, info)
            logged = done % t.log_every == 0 or done == t.steps
            evaluated = (t.eval_every and done % t.eval_every == 0) or done == t.steps
            saved = (t.ckpt_every and done % t.ckpt_every == 0) or done == t.steps or done == predecay
            if watch is not None:  # no host sync: the update applies, and a non-finite step is found by the next read
                grad_norm = watch.norm(done, reduced)
                update(params_with_grad(), grad_norm)
                if logged or evaluated or saved:
                    check_finite()
                train_loss, norm = (reduced.item(), grad_norm.item()) if logged else (math.nan, math.nan)
            else:  # skip mode or FSDP: one host sync decides whether the update applies
                params = params_with_grad()
                grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params])
                if hasattr(grad_norm, "full_tensor"):
                    grad_norm = grad_norm.full_tensor()
                train_loss, norm = torch.stack([reduced, grad_norm.float().reshape(())]).tolist()
                if math.isfinite(train_loss) and math.isfinite(norm):
                    update(params, grad_norm)
                else:
                    groups = nonfinite_groups(labels, trainable, info) or ["none"]
                    if t.on_nonfinite == "stop":
                        raise diverged(done, train_loss, norm, groups)
                    skipped_steps += 1
                    if info.main:
                        progress.note(f"warning: {nonfinite_line(done, train_loss, norm, groups)}; step skipped "
                                      f"({skipped_steps} so far)", always=True)
                    optimizer.zero_grad(set_to_none=True)
            tokens += tokens_per_step
            tick_tokens += tokens_per_step
            row = None
            if logged:
                now = time.perf_counter()
                tps = tick_tokens / max(now - tick, 1e-9)
                tick, tick_tokens = now, 0
                row = {"step": done, "tokens": tokens, "train_loss": train_loss, "lr": lr * cfg.optim.lr,
                       "lr_factor": lr, "grad_norm": norm, "tok_per_s": tps}
                if skipped_steps:
                    row["skipped_steps"] = skipped_steps
                aux = model.aux_loss()
                if aux is not None:
                    row["aux_loss"] = aux.item()
                metrics.write(**row)
            progress.step(done, row)
            if evaluated:
                val_loss = evaluate(step_fn, batches.eval_set, cfg, device)
                row = {"step": done, "tokens": tokens, "val_loss": val_loss}
                for m in eval_hooks:
                    row.update(m.eval_metrics())
                if gamma_stats:
                    row.update(scale_statistics(model))
                metrics.write(**row)
                progress.note(f"step {done}: val_loss {val_loss:.4f}")
            if saved:
                checkpoint(done)
            if done < t.steps and stop_requested(logged or saved):
                if not saved:
                    check_finite()
                    checkpoint(done)
                close()  # the bar ends its line before the stop is reported on a line of its own
                signum = stop.signum or signal.SIGTERM  # a rank that got no signal stops with the one that did
                who = "Ctrl-C (SIGINT)" if signum == signal.SIGINT else "SIGTERM"
                raise TrainingStopped(f"stopped by {who} after step {done}; its checkpoint is saved; continue with "
                                      f"scalevec train --resume {shlex.quote(str(run_dir))}", signum)
    except Exception as e:  # re-raised; a crash on weights that a non-finite step left is named as that step
        if watch is not None and not isinstance(e, (TrainingError, CheckpointError)):
            check_finite()
        raise
    close()
    if start >= t.steps:  # nothing left to do: report the stored final evaluation
        val_loss = evaluate(step_fn, batches.eval_set, cfg, device)
    wall = wall_prev + time.perf_counter() - t0
    summary = {
        "final_val_loss": val_loss, "params": counts["total"],
        "non_embedding_params": counts["non_embedding"],
        "scale_vector_params": counts["scale_vector"], "scale_vector_share": counts["scale_vector_share"],
        "tokens": tokens, "steps": t.steps, "wall_s": wall, "tok_per_s": tokens / max(wall, 1e-9),
        "flops_per_token": flops_per_token(cfg.model, t.seq_len),
        "strategy": cfg.scale.strategy, "model": cfg.model.preset, "optimizer": cfg.optim.name,
        "schedule": cfg.schedule.name, "world_size": info.world_size, "skipped_steps": skipped_steps,
        "device": str(device), "precision": t.precision, "compiled": compiled,
    }
    for k in ("active", "active_non_embedding"):
        if k in counts:
            summary[f"{k}_params"] = counts[k]
    if info.main:
        atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=1))
    return summary
