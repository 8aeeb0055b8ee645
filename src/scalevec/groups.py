"""Optimizer parameter groups derived from roles alone, with weight decay per the strategy's policy."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from scalevec.roles import Role, param_roles

# Roles whose parameters take the optimizer's weight decay regardless of the scale-vector policy.
DECAYED_ROLES = (Role.MATRIX, Role.EXPERT_MATRIX, Role.ROUTER, Role.EMBEDDING, Role.HEAD)


def decays(role: Role, policy: str) -> bool:
    """Whether parameters of ``role`` get weight decay under the scale-vector decay ``policy``."""
    if role == Role.INPUT_SCALE:
        return policy in ("input", "all")
    if role == Role.OUTPUT_SCALE:
        return policy in ("output", "all")
    return role in DECAYED_ROLES


@dataclass
class Group:
    role: Role
    names: list[str]
    params: list[nn.Parameter]
    weight_decay: float
    lr_mult: float

    def as_torch(self, lr: float) -> dict:
        return {"params": self.params, "names": self.names, "role": self.role.value,
                "weight_decay": self.weight_decay, "lr": lr * self.lr_mult, "lr_mult": self.lr_mult}


def param_groups(
    model: nn.Module,
    policy: str,
    weight_decay: float,
    lr_mult: dict[str, float] | None = None,
    roles: dict[str, Role] | None = None,
) -> list[Group]:
    """One group per role present in ``model``; ``roles`` maps names when the model is wrapped (FSDP/DDP)."""
    roles = roles or param_roles(model)
    lr_mult = lr_mult or {}
    by_role: dict[Role, Group] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        r = roles[name.removeprefix("module.")]
        g = by_role.get(r)
        if g is None:
            g = by_role[r] = Group(r, [], [], weight_decay if decays(r, policy) else 0.0, lr_mult.get(r.value, 1.0))
        g.names.append(name)
        g.params.append(p)
    return [by_role[r] for r in Role if r in by_role]
