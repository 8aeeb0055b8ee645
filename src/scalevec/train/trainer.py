"""The training loop: grad accumulation, clipping, autocast, eval on a fixed held-out set, metrics,
checkpoints, exact resume. Single process or torchrun (DDP / FSDP2). docs/reliability.md: what survives which
fault."""

from __future__ import annotations

import contextlib
import json
import math
import shlex
import signal
import time
from pathlib import Path

import torch

import scalevec.train.distributed as D
from scalevec.config import Config, ConfigError
from scalevec.device import autocast, pick_device
from scalevec.evaluate import evaluate
from scalevec.fileio import atomic_write_text
from scalevec.info import count_params
from scalevec.models import build_model
from scalevec.ops import dnp_swiglu
from scalevec.optim import build_optimizer, decay_start, lr_factor, set_lr
from scalevec.roles import param_roles
from scalevec.scale import scale_statistics
from scalevec.train.batches import load_batches
from scalevec.train.checkpoint import CheckpointError, injected_fault, list_checkpoints, save_checkpoint
from scalevec.train.compiling import (
    COMPILE_AUTO_MIN_STEPS,
    compile_model,
    cpu_compiler_available,
    use_compile,
)
from scalevec.train.errors import TrainingError, TrainingStopped
from scalevec.train.mfu import flops_per_token
from scalevec.train.nonfinite import (
    NonfiniteWatch,
    nonfinite_groups,
    nonfinite_line,
    param_labels,
    poison_grad,
)
from scalevec.train.progress import Metrics, Progress
from scalevec.train.resume import announce_resume, check_resume_config, load_for_resume, saved_config
from scalevec.train.run import save_tokenizer_files
from scalevec.train.signals import StopSignal
from scalevec.train.state import model_state, optim_state

# The compile policy's names stay importable from here for callers written before train/compiling.py held it.
__all__ = ["COMPILE_AUTO_MIN_STEPS", "Trainer", "TrainingError", "TrainingStopped", "cpu_compiler_available",
           "train"]

# Above this many passes over the training data a run says so: its validation loss mostly measures memorising.
EPOCH_WARNING = 4


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
    with contextlib.ExitStack() as cleanup:  # unwound last to first, on every way out
        cleanup.push(lambda kind, *_: D.cleanup(info, finished=kind is None))
        stop = cleanup.enter_context(StopSignal())
        return Trainer(cfg, device, info, stop, cleanup, resume, from_step).fit()


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


def prepare_run_dir(cfg: Config, run_dir: Path, resume: bool, info: D.DistInfo) -> Config | None:
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


class Trainer:
    """One run: built from its config (and checkpoint, on a resume), then ``step``, ``evaluate_and_log`` and
    ``save`` in turn until the last step, a stop signal or a non-finite step. What must be closed on the way out
    goes on ``cleanup``."""

    def __init__(self, cfg: Config, device: torch.device, info: D.DistInfo, stop: StopSignal,
                 cleanup: contextlib.ExitStack, resume: bool = False, from_step: int | None = None):
        self.cfg, self.device, self.info, self.stop = cfg, device, info, stop
        t = cfg.train
        self.run_dir = run_dir = Path(cfg.run.out)
        self.batches = load_batches(cfg, info)
        self.compiled = use_compile(t.compile, t.steps, device)  # refused before the folder is touched
        saved_cfg = prepare_run_dir(cfg, run_dir, resume, info)
        if info.main:
            save_tokenizer_files(self.batches.spec.tokenizer_dir, run_dir)

        torch.manual_seed(t.seed)
        self.model = model = build_model(cfg.model, cfg.scale).to(device)
        dnp_swiglu.enable(model)  # on CPU, DNP's kernel: built here rather than inside a traced forward
        roles = param_roles(model)
        self.counts = count_params(model)
        self.wrapped = D.wrap(model, cfg.dist.mode, info, device)
        self.optimizer = build_optimizer(self.wrapped, cfg.optim, cfg.scale.weight_decay, roles)
        self.step_fn = compile_model(self.wrapped) if self.compiled else self.wrapped
        self.hooks = [m for m in model.modules() if hasattr(m, "after_optimizer_step")]
        # Kept: walking the module tree every step is slow on CPU.
        self.trainable = [p for p in self.wrapped.parameters() if p.requires_grad]
        self.eval_hooks = [m for m in model.modules() if hasattr(m, "eval_metrics")]

        self.start, self.tokens, self.wall_prev, self.skipped_steps = 0, 0, 0.0, 0
        if resume:
            loaded = load_for_resume(run_dir, cfg, self.sharded_or_model(), self.optimizer, self.batches.loader,
                                     info, from_step)
            D.barrier(info)  # every rank has loaded before the main rank changes the run folder
            if loaded is not None:
                st = loaded.state
                self.start, self.tokens, self.wall_prev = st["step"], st["tokens"], st["wall_s"]
                self.skipped_steps = st.get("skipped_steps", 0)
            if info.main:
                announce_resume(run_dir, loaded, saved_cfg, cfg, from_step)
            D.barrier(info)  # superseded checkpoints are gone before any rank saves
        if info.main:
            for line in data_report(cfg, self.batches.loader, info.world_size, self.batches.vocab_note):
                print(line, flush=True)
        self.metrics = Metrics(run_dir / "metrics.jsonl", info.main, self.start if resume else None,
                               run_dir / "tensorboard" if t.tensorboard else None)
        cleanup.callback(self.metrics.close)
        # Under FSDP the gains are shards; their statistics would need a gather per vector at every evaluation.
        self.gamma_stats = t.scale_stats and cfg.dist.mode != "fsdp"
        # WSD: the last checkpoint at the peak LR is kept (pinned), the point a longer schedule continues from.
        self.predecay = decay_start(t.steps, cfg.schedule) if cfg.schedule.name == "wsd" and t.keep_predecay else -1
        self.tokens_per_step = t.batch_size * t.seq_len * t.grad_accum * info.world_size
        self.progress = Progress(info.main and t.progress, t.steps, self.start, run_dir.name)
        cleanup.callback(self.progress.close)  # the bar ends its line before any closing line is printed

        # A run that stops on a non-finite step needs no per-step host read to find it (FSDP shards the
        # gradients whose names the diagnosis needs, so it reads every step, as skip mode must).
        self.labels = param_labels(model, roles, self.trainable)
        self.watch = None
        if t.on_nonfinite == "stop" and not (info.enabled and cfg.dist.mode == "fsdp"):
            self.watch = NonfiniteWatch(self.trainable, self.labels, device)

        # Test-only faults (docs/reliability.md): step numbers as in metrics.jsonl, -1 when unset.
        nan_fault, inf_fault = injected_fault("nan_grad"), injected_fault("inf_loss")
        self.nan_step, self.nan_role = nan_fault or (-1, "")
        self.inf_step = inf_fault[0] if inf_fault else -1

    def sharded_or_model(self):
        """What holds the full state: FSDP's sharded module, else the plain model (not DDP's wrapper)."""
        return self.wrapped if self.cfg.dist.mode == "fsdp" else self.model

    def fit(self) -> dict:
        t = self.cfg.train
        self.t0 = time.perf_counter()
        self.tick, self.tick_tokens = time.perf_counter(), 0
        self.val_loss = math.nan
        self.wrapped.train()
        try:
            for step in range(self.start, t.steps):
                done = step + 1  # the step number of metrics rows and checkpoints: updates applied after this one
                logged = done % t.log_every == 0 or done == t.steps
                evaluated = (t.eval_every and done % t.eval_every == 0) or done == t.steps
                saved = (t.ckpt_every and done % t.ckpt_every == 0) or done == t.steps or done == self.predecay
                lr, train_loss, norm = self.step(step, logged, logged or evaluated or saved)
                self.evaluate_and_log(done, lr, train_loss, norm, logged, evaluated)
                if saved:
                    self.save(done)
                if done < t.steps and self.stop_requested(logged or saved):
                    self.stop_after(done, saved)
        except Exception as e:  # re-raised; a crash on weights that a non-finite step left is named as that step
            if self.watch is not None and not isinstance(e, (TrainingError, CheckpointError)):
                self.check_finite()
            raise
        return self.summary()

    def step(self, step: int, logged: bool, checked: bool) -> tuple[float, float, float]:
        """One optimizer step over ``grad_accum`` micro-batches: its LR factor, and its loss and gradient norm
        where they were read (``logged``; NaN otherwise). ``checked``: find a non-finite step before a write."""
        cfg, t, device, info = self.cfg, self.cfg.train, self.device, self.info
        done = step + 1
        lr = lr_factor(step, t.steps, cfg.schedule)
        set_lr(self.optimizer, lr, cfg.optim)
        loss_sum = torch.zeros((), device=device)
        for micro in range(t.grad_accum):
            x, y = self.batches.loader.next_batch()
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            sync = contextlib.nullcontext()
            if info.enabled and cfg.dist.mode == "ddp" and micro < t.grad_accum - 1:
                sync = self.wrapped.no_sync()
            with sync, autocast(t.precision, device):
                loss = self.step_fn(x, y)
                if done == self.inf_step:
                    loss = loss * math.inf
                aux = self.model.aux_loss()
                total = loss if aux is None else loss + aux
            (total / t.grad_accum).backward()
            loss_sum += loss.detach().float()
        if done == self.nan_step:
            poison_grad(self.optimizer, self.nan_role)
        reduced = D.all_reduce_mean(loss_sum / t.grad_accum, info)
        if self.watch is not None:  # no host sync: the update applies, and a non-finite step is found by the next read
            grad_norm = self.watch.norm(done, reduced)
            self.update([p for p in self.trainable if p.grad is not None], grad_norm)
            if checked:
                self.check_finite()
            train_loss, norm = (reduced.item(), grad_norm.item()) if logged else (math.nan, math.nan)
        else:  # skip mode or FSDP: one host sync decides whether the update applies
            params = [p for p in self.trainable if p.grad is not None]
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params])
            if hasattr(grad_norm, "full_tensor"):
                grad_norm = grad_norm.full_tensor()
            train_loss, norm = torch.stack([reduced, grad_norm.float().reshape(())]).tolist()
            if math.isfinite(train_loss) and math.isfinite(norm):
                self.update(params, grad_norm)
            else:
                groups = nonfinite_groups(self.labels, self.trainable, info) or ["none"]
                if t.on_nonfinite == "stop":
                    raise self.diverged(done, train_loss, norm, groups)
                self.skipped_steps += 1
                if info.main:
                    self.progress.note(f"warning: {nonfinite_line(done, train_loss, norm, groups)}; step skipped "
                                       f"({self.skipped_steps} so far)", always=True)
                self.optimizer.zero_grad(set_to_none=True)
        self.tokens += self.tokens_per_step
        self.tick_tokens += self.tokens_per_step
        return lr, train_loss, norm

    def update(self, params: list, grad_norm: torch.Tensor) -> None:
        # clip_grad_norm_ split in two: clipping with a non-finite norm would smear NaN over every gradient
        # and hide which groups diverged.
        if self.cfg.optim.grad_clip:
            torch.nn.utils.clip_grads_with_norm_(params, self.cfg.optim.grad_clip, grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        for m in self.hooks:
            m.after_optimizer_step()

    def evaluate_and_log(self, done: int, lr: float, train_loss: float, norm: float, logged: bool,
                         evaluated: bool) -> None:
        """The step's metrics row when it is ``logged``, progress, and the held-out loss when ``evaluated``."""
        row = None
        if logged:
            now = time.perf_counter()
            tps = self.tick_tokens / max(now - self.tick, 1e-9)
            self.tick, self.tick_tokens = now, 0
            row = {"step": done, "tokens": self.tokens, "train_loss": train_loss, "lr": lr * self.cfg.optim.lr,
                   "lr_factor": lr, "grad_norm": norm, "tok_per_s": tps}
            if self.skipped_steps:
                row["skipped_steps"] = self.skipped_steps
            aux = self.model.aux_loss()
            if aux is not None:
                row["aux_loss"] = aux.item()
            self.metrics.write(**row)
        self.progress.step(done, row)
        if evaluated:
            self.val_loss = evaluate(self.step_fn, self.batches.eval_set, self.cfg, self.device)
            row = {"step": done, "tokens": self.tokens, "val_loss": self.val_loss}
            for m in self.eval_hooks:
                row.update(m.eval_metrics())
            if self.gamma_stats:
                row.update(scale_statistics(self.model))
            self.metrics.write(**row)
            self.progress.note(f"step {done}: val_loss {self.val_loss:.4f}")

    def save(self, step: int) -> None:
        """A checkpoint of every rank's state after ``step``; the main rank writes it."""
        cfg, info, loader = self.cfg, self.info, self.batches.loader
        loader_states = [loader.state_dict()]
        if info.enabled:
            gathered: list = [None] * info.world_size
            torch.distributed.all_gather_object(gathered, loader.state_dict())
            loader_states = gathered
        mstate = model_state(self.sharded_or_model(), cfg.dist.mode, info)
        ostate = optim_state(self.wrapped, self.optimizer, cfg.dist.mode, info)
        if info.main:
            state = {"step": step, "tokens": self.tokens, "optimizer": ostate, "rng": torch.get_rng_state(),
                     "loader": loader_states if info.enabled else loader_states[0],
                     "wall_s": self.wall_prev + time.perf_counter() - self.t0, "skipped_steps": self.skipped_steps,
                     "total_steps": cfg.train.steps}
            save_checkpoint(self.run_dir, step, mstate, state, cfg.train.keep_ckpts, pinned=step == self.predecay)
        D.barrier(info)

    def diverged(self, step: int, loss: float, norm: float, groups: list[str]) -> TrainingError:
        kept = list_checkpoints(self.run_dir)
        kept_msg = f"the last good checkpoint {kept[-1]} is kept" if kept else "no checkpoint yet"
        return TrainingError(f"{nonfinite_line(step, loss, norm, groups)}; {kept_msg}; train.on_nonfinite=skip "
                             "skips such steps instead")

    def check_finite(self) -> None:
        found = self.watch.first() if self.watch is not None else None
        if found is not None:
            step, loss, norm, groups = found
            raise self.diverged(step, loss, norm, groups or ["none"])

    def stop_requested(self, at_sync: bool) -> bool:
        """Single process: the flag. Across ranks: agreed (any rank's signal) at logged or saved steps, so that
        every rank stops after the same step without a collective and a read every step."""
        if not self.info.enabled:
            return self.stop.requested
        if not at_sync:
            return False
        votes = torch.full((), float(self.stop.requested), device=self.device)
        return D.all_reduce_sum(votes, self.info).item() > 0

    def stop_after(self, done: int, saved: bool) -> None:
        """Save the finished step (unless it just was) and stop with the line that says how to continue."""
        if not saved:
            self.check_finite()
            self.save(done)
        signum = self.stop.signum or signal.SIGTERM  # a rank that got no signal stops with the one that did
        who = "Ctrl-C (SIGINT)" if signum == signal.SIGINT else "SIGTERM"
        raise TrainingStopped(f"stopped by {who} after step {done}; its checkpoint is saved; continue with "
                              f"scalevec train --resume {shlex.quote(str(self.run_dir))}", signum)

    def summary(self) -> dict:
        cfg, t, counts, info = self.cfg, self.cfg.train, self.counts, self.info
        if self.start >= t.steps:  # nothing left to do: report the stored final evaluation
            self.val_loss = evaluate(self.step_fn, self.batches.eval_set, cfg, self.device)
        wall = self.wall_prev + time.perf_counter() - self.t0
        summary = {
            "final_val_loss": self.val_loss, "params": counts["total"],
            "non_embedding_params": counts["non_embedding"],
            "scale_vector_params": counts["scale_vector"], "scale_vector_share": counts["scale_vector_share"],
            "tokens": self.tokens, "steps": t.steps, "wall_s": wall, "tok_per_s": self.tokens / max(wall, 1e-9),
            "flops_per_token": flops_per_token(cfg.model, t.seq_len),
            "strategy": cfg.scale.strategy, "model": cfg.model.preset, "optimizer": cfg.optim.name,
            "schedule": cfg.schedule.name, "world_size": info.world_size, "skipped_steps": self.skipped_steps,
            "device": str(self.device), "precision": t.precision, "compiled": self.compiled,
        }
        for k in ("active", "active_non_embedding"):
            if k in counts:
                summary[f"{k}_params"] = counts[k]
        if info.main:
            atomic_write_text(self.run_dir / "summary.json", json.dumps(summary, indent=1))
        return summary
