"""Muon for stacked matrices: ``torch.optim.Muon`` applied to every trailing 2-D slice of a parameter.

Expert weights live as one ``(E, out, in)`` tensor so the forward is one grouped GEMM; Muon must still
orthogonalise each expert's matrix on its own. Splitting them into E parameters would cost a stack per step
and E small Newton–Schulz chains; here the whole stack runs as one batched chain (``baddbmm``), with the same
momentum, Newton–Schulz coefficients, LR adjustment (from the slice shape) and decoupled weight decay as
``torch.optim.Muon``. Slices along the leading dimension are independent, so a stack sharded by expert
(FSDP2 ``Shard(0)``) is orthogonalised locally.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.optim._muon import DEFAULT_A, DEFAULT_B, DEFAULT_C, DEFAULT_NS_STEPS, EPS, _adjust_lr


def zeropower_batched(g: Tensor, coefficients: tuple[float, float, float], steps: int, eps: float) -> Tensor:
    """Newton–Schulz orthogonalisation of every trailing 2-D slice of ``g`` (in bf16, as torch's Muon)."""
    a, b, c = coefficients
    x = g.bfloat16()
    tall = g.size(-2) > g.size(-1)
    if tall:
        x = x.mT
    x = x / torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True).clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.mT
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.mT if tall else x


class BatchedMuon(torch.optim.Optimizer):
    """``torch.optim.Muon`` semantics per 2-D slice, for parameters of shape ``(*lead, out, in)``."""

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_coefficients: tuple[float, float, float] = (DEFAULT_A, DEFAULT_B, DEFAULT_C),
        eps: float = EPS,
        ns_steps: int = DEFAULT_NS_STEPS,
        adjust_lr_fn: str | None = None,
    ) -> None:
        if lr < 0 or momentum < 0 or weight_decay < 0:
            raise ValueError(f"lr, momentum and weight_decay must be >= 0, got {lr}, {momentum}, {weight_decay}")
        if adjust_lr_fn not in (None, "original", "match_rms_adamw"):
            raise ValueError(f"Adjust learning rate function {adjust_lr_fn} is not supported")
        if ns_steps >= 100 or len(ns_coefficients) != 3:
            raise ValueError("ns_steps must be < 100 and ns_coefficients three numbers")
        defaults = {"lr": lr, "weight_decay": weight_decay, "momentum": momentum, "nesterov": nesterov,
                    "ns_coefficients": ns_coefficients, "eps": eps, "ns_steps": ns_steps, "adjust_lr_fn": adjust_lr_fn}
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim < 2:
                    raise ValueError(f"BatchedMuon needs parameters of at least 2 dimensions, got {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, wd, mu = float(group["lr"]), group["weight_decay"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if torch.is_complex(p) or p.grad.is_sparse:
                    raise RuntimeError("BatchedMuon supports dense real parameters only")
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - mu)
                update = p.grad.lerp(buf, mu) if group["nesterov"] else buf
                stack = update.reshape(-1, *update.shape[-2:])
                ortho = zeropower_batched(stack, group["ns_coefficients"], group["ns_steps"], group["eps"])
                p.mul_(1 - lr * wd)
                p.add_(ortho.view(update.shape), alpha=-_adjust_lr(lr, group["adjust_lr_fn"], p.shape[-2:]))
        return loss
