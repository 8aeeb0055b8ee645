"""Parameter roles: every parameter is born with one, and optimizer groups, weight decay, Muon routing
and reporting derive from roles alone (never from names or ``ndim``)."""

from __future__ import annotations

from enum import Enum

import torch
from torch import nn


class Role(str, Enum):
    EMBEDDING = "embedding"
    HEAD = "head"
    MATRIX = "matrix"  # 2-D hidden weights (attention, MLP)
    EXPERT_MATRIX = "expert_matrix"  # 3-D batched expert weights (E, out, in)
    ROUTER = "router"
    INPUT_SCALE = "input_scale"  # Input-Norm gains: read by a linear map
    OUTPUT_SCALE = "output_scale"  # Output-Norm gains: QK-norm, post-branch, and γ_a not read by a linear map
    BIAS = "bias"


ROLE_NAMES = tuple(r.value for r in Role)
SCALE_ROLES = (Role.INPUT_SCALE, Role.OUTPUT_SCALE)
_ATTR = "_scalevec_role"
_MAP = "_scalevec_roles"


def tag(p: nn.Parameter, role: Role) -> nn.Parameter:
    setattr(p, _ATTR, Role(role))
    return p


def role_of(p: torch.Tensor) -> Role | None:
    return getattr(p, _ATTR, None)


def param_roles(model: nn.Module) -> dict[str, Role]:
    """Name -> role for every parameter; raises if one was left untagged (a bug in a layer).

    ``copy.deepcopy`` makes new Parameters without our attribute; ``remember_roles`` keeps a name -> role map
    on the module (copied with it), from which the tags are restored.
    """
    saved: dict[str, Role] = getattr(model, _MAP, {})
    roles: dict[str, Role] = {}
    for name, p in model.named_parameters():
        r = role_of(p)
        if r is None and name in saved:
            r = role_of(tag(p, saved[name]))
        if r is None:
            raise RuntimeError(f"parameter {name!r} has no role; every layer must tag what it creates")
        roles[name] = r
    return roles


def remember_roles(model: nn.Module) -> nn.Module:
    """Store the role map on ``model`` so copies of it (deepcopy, pickling) keep their roles."""
    object.__setattr__(model, _MAP, param_roles(model))
    return model
