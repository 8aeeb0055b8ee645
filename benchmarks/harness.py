"""Shared pieces of the benchmarks: shapes, one training step as the trainer runs it, interleaved timing,
memory accounting, FLOP counts and a measured matmul peak.

Machines here are shared and noisy, so nothing is timed alone: candidates run in rounds (A, B, A, B, ...),
each round times a few steps of every candidate, and results are medians over rounds of per-round ratios.
"""

from __future__ import annotations

import contextlib
import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from scalevec.config import OptimConfig
from scalevec.models import build_model, model_preset
from scalevec.models.config import ModelConfig
from scalevec.ops import dnp_swiglu as kernel_ops
from scalevec.optim import build_optimizer
from scalevec.strategy import ScaleConfig, preset
from scalevec.train.compiling import compile_model
from scalevec.train.mfu import flops_breakdown as flops_per_token  # noqa: F401 - the benchmarks import it from here
from scalevec.train.mfu import measure_matmul_peak

VOCAB = 4096  # the data pipeline's default BPE vocabulary (already a multiple of 64)


@dataclass(frozen=True)
class Shape:
    """A model preset at a benchmark size: ``layers`` overrides the depth (0: the preset's)."""

    name: str
    preset: str
    batch: int
    seq: int
    layers: int = 0

    vocab: int = VOCAB

    def model_config(self) -> ModelConfig:
        mc = model_preset(self.preset)
        mc.vocab_size = self.vocab
        if self.layers:
            mc.n_layers = self.layers
        return mc

    @property
    def tokens(self) -> int:
        return self.batch * self.seq


# The demo's shape for tiny; the 0.12B shape (d=768, 12 heads, d_ff=3328) at depth 2 so CPU steps take ~1 s.
SHAPES = {s.name: s for s in (
    Shape("tiny", "tiny", 16, 128),
    Shape("small", "small", 16, 128),
    Shape("0.12b-d2", "0.12b", 4, 256, layers=2),
    Shape("moe-tiny", "moe-tiny", 16, 128),
    Shape("moe-small", "moe-small", 16, 128),
    Shape("moe-0.12b-d2", "moe-0.12b", 4, 256, layers=2),
)}


def scale_config(strategy: str | ScaleConfig) -> ScaleConfig:
    """A preset by name, or a ``ScaleConfig`` as given."""
    return strategy if isinstance(strategy, ScaleConfig) else preset(strategy)


def build(shape: Shape, strategy: str | ScaleConfig, seed: int = 0, device: str = "cpu") -> nn.Module:
    torch.manual_seed(seed)
    model = build_model(shape.model_config(), scale_config(strategy)).to(device)
    kernel_ops.enable(model)  # as the trainer does: DNP's kernel on CPU, nothing on a GPU
    return model


def batch(shape: Shape, seed: int = 0, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, shape.model_config().vocab_size, (shape.batch, shape.seq + 1), generator=g).to(device)
    return x[:, :-1].contiguous(), x[:, 1:].contiguous()


def autocast(precision: str, device: str = "cpu"):
    if precision == "bf16":
        return torch.autocast(device, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class Step:
    """One optimizer step as ``train/trainer.py`` runs it (one micro-batch): autocast forward of the (optionally
    compiled) model, MoE aux loss, backward, total gradient norm, finiteness check, clipping, the optimizer
    step (scalevec's role groups, fused AdamW by default), ``zero_grad``."""

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, precision: str = "bf16",
                 compile: bool = False, strategy: str | ScaleConfig = "baseline",
                 optimizer: torch.optim.Optimizer | None = None,
                 compiler: Callable[[nn.Module], nn.Module] = compile_model):
        self.model, self.x, self.y, self.precision = model, x, y, precision
        # compile_model: as the trainer compiles; the plain reference passes torch.compile
        self.fn = compiler(model) if compile else model
        self.optimizer = optimizer or build_optimizer(model, OptimConfig(), scale_config(strategy).weight_decay)
        self.aux = getattr(model, "aux_loss", lambda: None)
        self.trainable = [p for p in model.parameters() if p.requires_grad]  # as the trainer keeps it

    def forward(self) -> torch.Tensor:
        with autocast(self.precision, self.x.device.type):
            loss = self.fn(self.x, self.y)
            aux = self.aux()
            return loss if aux is None else loss + aux

    def __call__(self) -> float:
        loss = self.forward()
        loss.backward()
        params = [p for p in self.trainable if p.grad is not None]
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        if not bool(torch.isfinite(loss) and torch.isfinite(norm)):
            raise FloatingPointError("non-finite loss or gradient in a benchmark step")
        torch.nn.utils.clip_grads_with_norm_(params, 1.0, norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()


def interleaved(cands: dict[str, Callable[[], object]], rounds: int, steps: int, warmup: int = 2,
                sync: Callable[[], None] = lambda: None) -> dict[str, list[float]]:
    """Seconds per step of every candidate, one entry per round; the candidates alternate within a round and
    the order is reversed every other round so no candidate always follows the same one."""
    for fn in cands.values():
        for _ in range(warmup):
            fn()
    sync()
    times: dict[str, list[float]] = {k: [] for k in cands}
    names = list(cands)
    for r in range(rounds):
        for k in names if r % 2 == 0 else names[::-1]:
            fn = cands[k]
            t0 = time.perf_counter()
            for _ in range(steps):
                fn()
            sync()
            times[k].append((time.perf_counter() - t0) / steps)
    return times


def warm_steps(shape: Shape, strategies: list[str], x: torch.Tensor, y: torch.Tensor, precision: str = "bf16",
               compile: bool = True, warmup: int = 3) -> dict[str, Step]:
    """One ``Step`` per strategy, each run ``warmup`` times (compilation, allocator) before anything is timed."""
    steps = {s: Step(build(shape, s), x, y, precision, compile, s) for s in strategies}
    for step in steps.values():
        for _ in range(warmup):
            step()
    return steps


def interleaved_calls(steps: dict[str, Step], rounds: int, fn: Callable[[Step], list[float]]) -> dict[str, list]:
    """``fn(step)`` (one round's measurement of a step) for every step, alternating as in ``interleaved``."""
    out: dict[str, list] = {s: [] for s in steps}
    names = list(steps)
    for r in range(rounds):
        for s in names if r % 2 == 0 else names[::-1]:
            out[s].append(fn(steps[s]))
    return out


def ratio(times: dict[str, list[float]], num: str, den: str) -> float:
    """Median over rounds of the per-round time ratio (drift in machine load cancels within a round)."""
    return statistics.median(a / b for a, b in zip(times[num], times[den]))


def median(xs: list[float]) -> float:
    return statistics.median(xs)


# ---- memory --------------------------------------------------------------------------------------------------


def _storage_key(t: torch.Tensor) -> tuple[int, int]:
    s = t.untyped_storage()
    return s.data_ptr(), s.nbytes()


def saved_activation_bytes(step: Step) -> int:
    """Bytes held for backward at the end of one forward: unique storages of every tensor autograd saves,
    parameters excluded (they exist anyway). Deterministic, and exactly what backward must keep alive.

    Works under ``torch.compile`` too: the compiled region saves its tensors through the same hooks."""
    params = {_storage_key(p) for p in step.model.parameters()}
    seen: dict[tuple[int, int], int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = _storage_key(t)
        if key not in params:
            seen[key] = key[1]
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = step.forward()
    total = sum(seen.values())
    loss.backward()
    step.optimizer.zero_grad(set_to_none=True)
    return total


def state_bytes(step: Step) -> int:
    """Parameters, their gradients and the optimizer state (AdamW: two moments; Muon: one), in bytes."""
    params = list(step.model.parameters())
    n = sum(p.numel() * p.element_size() for p in params)
    opts = getattr(step.optimizer, "optimizers", {"": step.optimizer}).values()  # scalevec's CombinedOptimizer
    opt = sum(v.numel() * v.element_size() for o in opts for s in o.state.values()
              for v in s.values() if torch.is_tensor(v) and v.dim() > 0)
    return 2 * n + opt  # parameters + gradients (fp32, one per parameter) + moments


def training_memory(step: Step) -> dict[str, int]:
    """``state``: parameters + gradients + optimizer moments; ``activations``: saved for backward; their sum
    bounds the step's peak (grads are freed by ``zero_grad``, so the peak sits at the start of backward)."""
    step()  # allocate optimizer state and run any compile
    act = saved_activation_bytes(step)
    st = state_bytes(step)
    return {"state": st, "activations": act, "total": st + act}


# ---- FLOPs and peak ------------------------------------------------------------------------------------------


def matmul_peak(dtype: torch.dtype = torch.bfloat16, n: int = 2048, reps: int = 10,
                device: str = "cpu") -> float:
    """Measured matmul throughput (FLOP/s) of an n×n×n product: the best of ``reps`` runs, as a peak."""
    return measure_matmul_peak(device, dtype, n, reps)


def release() -> None:
    gc.collect()
