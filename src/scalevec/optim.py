"""Optimizers built from role-based groups, and LR schedules as pure functions of the step.

AdamW: every group. Muon: ``torch.optim.Muon`` for 2-D hidden matrices (and a batched Muon for 3-D expert
weights), AdamW for embeddings, head, router, biases and every scale vector. Schedules are stateless functions of
the step, so a resumed run needs no scheduler state to continue exactly.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from scalevec.config import OptimConfig, ScheduleConfig
from scalevec.groups import Group, param_groups
from scalevec.roles import Role

MUON_ROLES = (Role.MATRIX, Role.EXPERT_MATRIX)


class CombinedOptimizer:
    """Several torch optimizers stepped together; one state dict, one list of param groups."""

    def __init__(self, optimizers: dict[str, torch.optim.Optimizer]):
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict]:
        return [g for opt in self.optimizers.values() for g in opt.param_groups]

    def step(self) -> None:
        for opt in self.optimizers.values():
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {k: opt.state_dict() for k, opt in self.optimizers.items()}

    def load_state_dict(self, state: dict) -> None:
        if set(state) != set(self.optimizers):
            raise ValueError(f"optimizer state holds {sorted(state)}, expected {sorted(self.optimizers)}")
        for k, opt in self.optimizers.items():
            opt.load_state_dict(state[k])


def build_optimizer(
    model: nn.Module, optim: OptimConfig, decay_policy: str, roles: dict[str, Role] | None = None
) -> CombinedOptimizer:
    groups = param_groups(model, decay_policy, optim.weight_decay, optim.lr_mult, roles)
    fused = _fused_ok(model)
    if optim.name == "adamw":
        adam = [g.as_torch(optim.lr) for g in groups]
        return CombinedOptimizer({"adamw": torch.optim.AdamW(adam, lr=optim.lr, betas=optim.betas,
                                                              eps=optim.eps, fused=fused)})
    muon = [g for g in groups if g.role == Role.MATRIX]
    experts = [g for g in groups if g.role == Role.EXPERT_MATRIX]
    rest = [g for g in groups if g.role not in MUON_ROLES]
    opts: dict[str, torch.optim.Optimizer] = {}
    if rest:
        opts["adamw"] = torch.optim.AdamW([g.as_torch(optim.lr) for g in rest], lr=optim.lr, betas=optim.betas,
                                          eps=optim.eps, fused=fused)
    if muon:
        opts["muon"] = torch.optim.Muon(_muon_groups(muon, optim.muon_lr), lr=optim.muon_lr,
                                        momentum=optim.momentum)
    if experts:
        from scalevec.muon_batched import BatchedMuon

        opts["muon_experts"] = BatchedMuon(_muon_groups(experts, optim.muon_lr), lr=optim.muon_lr,
                                           momentum=optim.momentum)
    return CombinedOptimizer(opts)


def _muon_groups(groups: list[Group], lr: float) -> list[dict]:
    out = []
    for g in groups:
        d = g.as_torch(lr)
        d.pop("names")  # torch.optim.Muon accepts only its own group keys plus ours below
        out.append(d)
    return out


def _fused_ok(model: nn.Module) -> bool | None:
    p = next(model.parameters())
    # Fused AdamW is a single kernel over all tensors on CUDA and CPU; DTensor params (FSDP2) need foreach.
    return True if type(p.data) is torch.Tensor and p.device.type in ("cuda", "cpu") else None


def warmup_steps(cfg: ScheduleConfig, total: int) -> int:
    return int(cfg.warmup * total) if cfg.warmup < 1 else int(cfg.warmup)


def decay_start(total: int, cfg: ScheduleConfig) -> int:
    """WSD: the first step (0-based) of the decay phase; the checkpoint of this many steps is the last at the
    peak LR, the point from which a longer schedule continues."""
    return total - max(1, round(cfg.decay_fraction * total))


def lr_factor(step: int, total: int, cfg: ScheduleConfig) -> float:
    """LR / peak LR at ``step`` (0-based) of ``total`` steps."""
    warm = warmup_steps(cfg, total)
    if step < warm:
        return (step + 1) / warm
    floor = cfg.min_lr_ratio
    if cfg.name == "constant":
        return 1.0
    span = max(1, total - warm)
    t = min(1.0, (step - warm) / span)
    if cfg.name == "cosine":
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))
    if cfg.name == "linear":
        return 1 - (1 - floor) * t
    # WSD: stable at the peak, then decay over the last ``decay_fraction`` of all steps.
    start = decay_start(total, cfg)
    decay = total - start
    if step < start:
        return 1.0
    u = min(1.0, (step - start + 1) / decay)
    shape = {"linear": u, "cosine": 0.5 * (1 - math.cos(math.pi * u)), "1-sqrt": math.sqrt(u)}[cfg.decay_shape]
    return 1 - (1 - floor) * shape


def set_lr(optimizer: CombinedOptimizer, factor: float, optim: OptimConfig) -> None:
    for g in optimizer.param_groups:
        base = optim.muon_lr if g["role"] in (Role.MATRIX.value, Role.EXPERT_MATRIX.value) and optim.name == "muon" \
            else optim.lr
        g["lr"] = base * g["lr_mult"] * factor
