"""Scale vectors: the learnable gains of normalization layers, in three parameterisations.

``plain``: γ itself. ``or``: γ = m · √d · α/‖α‖ (magnitude in the original space). ``er``: the same with
m = exp(b) (magnitude in exponential space). All three equal ``init`` at initialisation (PAPER.md section 3).
Options: a vector magnitude instead of a scalar, no √d factor, and an elementwise exp on the direction for ER.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from scalevec.roles import Role, tag


class ScaleVector(nn.Module):
    """A gain of size ``dim`` (or ``(n, dim)`` for per-expert gains) with a role fixed at construction."""

    def __init__(
        self,
        dim: int,
        param: str = "plain",
        role: Role = Role.INPUT_SCALE,
        init: float = 1.0,
        magnitude: str = "scalar",
        sqrt_d: bool = True,
        er_exp: str = "magnitude",
        lead: tuple[int, ...] = (),
        slot: str = "",
    ):
        super().__init__()
        if param not in ("plain", "or", "er"):
            raise ValueError(f"unknown scale-vector parameterisation {param!r}")
        self.dim, self.param, self.role, self.slot = dim, param, Role(role), slot
        self.magnitude_kind, self.sqrt_d, self.er_exp = magnitude, sqrt_d, er_exp
        self.init_value = float(init)
        shape = (*lead, dim)
        mshape = (*lead, 1) if magnitude == "scalar" else shape
        if param == "plain":
            self.gamma = tag(nn.Parameter(torch.full(shape, self.init_value)), role)
            return
        # Direction α starts at ones, so √d·α/‖α‖ = 1 and γ = m = init.
        self.direction = tag(nn.Parameter(torch.ones(shape) if er_exp == "magnitude" or param == "or"
                                          else torch.zeros(shape)), role)
        m0 = self.init_value if param == "or" else math.log(self.init_value)
        self.magnitude = tag(nn.Parameter(torch.full(mshape, m0)), role)
        if not sqrt_d:  # without √d the unit direction has entries 1/√d: rescale m so γ = init still
            with torch.no_grad():
                if param == "or":
                    self.magnitude.mul_(math.sqrt(dim))
                else:
                    self.magnitude.add_(0.5 * math.log(dim))

    def forward(self) -> torch.Tensor:
        if self.param == "plain":
            return self.gamma
        if self.param == "or":
            m = self.magnitude
            a = self.direction
        else:
            m = self.magnitude.exp()
            a = self.direction.exp() if self.er_exp == "elementwise" else self.direction
        unit = a * torch.rsqrt(a.pow(2).sum(-1, keepdim=True))
        if self.sqrt_d:
            unit = unit * math.sqrt(self.dim)
        return m * unit

    @torch.no_grad()
    def set_value(self, value: torch.Tensor) -> None:
        """Set the parameters so that ``forward()`` returns ``value`` (used by import retrofits)."""
        value = value.to(self._dtype()).expand(self._shape())
        if self.param == "plain":
            self.gamma.copy_(value)
            return
        if self.magnitude_kind != "scalar":
            raise ValueError("set_value supports scalar magnitudes only")
        norm = value.norm(dim=-1, keepdim=True)
        # Keep ‖α‖ = √d as at init, so the optimizer sees the same geometry after a retrofit as after init.
        unit = value / norm * math.sqrt(self.dim)
        m = norm / math.sqrt(self.dim) if self.sqrt_d else norm
        if self.param == "or":
            self.magnitude.copy_(m)
            self.direction.copy_(unit)
        elif self.er_exp == "magnitude":
            self.magnitude.copy_(m.log())
            self.direction.copy_(unit)
        else:
            if (value <= 0).any():
                raise ValueError("ER with an elementwise exp cannot represent non-positive gains")
            self.magnitude.copy_(m.log())
            self.direction.copy_(value.log())  # exp(α)/‖exp(α)‖ = value/‖value‖

    def _shape(self) -> torch.Size:
        return (self.gamma if self.param == "plain" else self.direction).shape

    def _dtype(self) -> torch.dtype:
        return (self.gamma if self.param == "plain" else self.direction).dtype

    def extra_repr(self) -> str:
        return f"{self.slot or 'γ'}: dim={self.dim}, param={self.param}, role={self.role.value}"


def make_scale(
    dim: int, param: str, role: Role, cfg, slot: str, lead: tuple[int, ...] = ()
) -> ScaleVector | None:
    """A scale vector configured from a ``ScaleConfig``; ``None`` for ``param='none'``."""
    if param == "none":
        return None
    role = Role(f"{cfg.roles[slot]}_scale") if slot in cfg.roles else role
    return ScaleVector(dim, param, role, init=cfg.init, magnitude=cfg.magnitude, sqrt_d=cfg.sqrt_d,
                       er_exp=cfg.er_exp, lead=lead, slot=slot)


@torch.no_grad()
def scale_statistics(model: nn.Module) -> dict[str, float]:
    """Mean, std, min and max of every γ in ``model`` (and the mean magnitude for OR/ER), keyed
    ``gamma/<module>/<stat>``: the per-site, per-layer dynamics the paper uses to motivate HG."""
    out: dict[str, float] = {}
    for name, m in model.named_modules():
        if not isinstance(m, ScaleVector):
            continue
        g = m().detach().float()
        out[f"gamma/{name}/mean"] = g.mean().item()
        out[f"gamma/{name}/std"] = g.std().item() if g.numel() > 1 else 0.0
        out[f"gamma/{name}/min"] = g.min().item()
        out[f"gamma/{name}/max"] = g.max().item()
        if m.param in ("or", "er"):
            mag = m.magnitude.detach().float()
            out[f"gamma/{name}/magnitude"] = (mag.exp() if m.param == "er" else mag).mean().item()
    return out
