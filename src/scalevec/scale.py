"""Scale vectors: the learnable gains of normalization layers, in three parameterisations.

``plain``: γ itself. ``or``: γ = m · √d · α/‖α‖ (magnitude in the original space). ``er``: the same with
m = exp(b) (magnitude in exponential space). All three equal ``init`` at initialisation (docs/paper.md).
Options: a vector magnitude instead of a scalar, no √d factor, and an elementwise exp on the direction for ER.

Every gain is stored as one parameter tensor: OR/ER keep α and m side by side in ``packed`` (a checkpoint with
them apart loads through a state-dict hook). A vector may have leading dimensions: one gain per expert, or HG's
input gains of a site as the rows of one vector in branch order (``layers.SiteGains``); OR/ER normalise each
row on its own, and AdamW acts elementwise, so rows behave as separate gains.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import nn

from scalevec.roles import Role, tag
from scalevec.strategy import ScaleConfig


class ScaleVector(nn.Module):
    """A gain of size ``dim`` (or ``(*lead, dim)``: per-expert gains, HG's branch rows) with a role fixed at
    construction; ``slot`` is its ``scale.roles`` key (HG's rows: their slots joined by ``,``)."""

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
        if param == "plain":
            self.gamma = tag(nn.Parameter(torch.full(shape, self.init_value)), role)
            return
        # Direction α starts at ones, so √d·α/‖α‖ = 1 and γ = m = init (ER elementwise: exp(0) = 1).
        a0 = 0.0 if param == "er" and er_exp == "elementwise" else 1.0
        m0 = self.init_value if param == "or" else math.log(self.init_value)
        if not sqrt_d:  # without √d the unit direction has entries 1/√d: rescale m so γ = init still
            m0 = m0 * math.sqrt(dim) if param == "or" else m0 + 0.5 * math.log(dim)
        width = 1 if magnitude == "scalar" else dim
        self.packed = tag(nn.Parameter(torch.cat([torch.full(shape, a0), torch.full((*lead, width), m0)], -1)), role)
        self.register_load_state_dict_pre_hook(_pack_direction_magnitude)

    @property
    def direction(self) -> torch.Tensor:
        """α: a view of ``packed`` (writes go to the parameter)."""
        return self.packed[..., : self.dim]

    @property
    def magnitude(self) -> torch.Tensor:
        """m (OR) or log m (ER): a view of ``packed``, one entry per row or one per element."""
        return self.packed[..., self.dim:]

    def forward(self) -> torch.Tensor:
        if self.param == "plain":
            return self.gamma
        m, a = self.magnitude, self.direction
        if self.param == "er":
            m = m.exp()
            a = a.exp() if self.er_exp == "elementwise" else a
        unit = a * torch.rsqrt(a.pow(2).sum(-1, keepdim=True))
        if self.sqrt_d:
            unit = unit * math.sqrt(self.dim)
        return m * unit

    @torch.no_grad()
    def set_value(self, value: torch.Tensor, row: int | None = None) -> None:
        """Set the parameters so that ``forward()`` (or its ``row``) returns ``value`` (import retrofits,
        folding)."""
        shape = self._shape() if row is None else self._shape()[1:]
        value = value.to(self._dtype()).expand(shape)
        if self.param == "plain":
            (self.gamma if row is None else self.gamma[row]).copy_(value)
            return
        if self.magnitude_kind != "scalar":
            raise ValueError("set_value supports scalar magnitudes only")
        direction, magnitude = self.direction, self.magnitude
        if row is not None:
            direction, magnitude = direction[row], magnitude[row]
        norm = value.norm(dim=-1, keepdim=True)
        # Keep ‖α‖ = √d as at init, so the optimizer sees the same geometry after a retrofit as after init.
        unit = value / norm * math.sqrt(self.dim)
        m = norm / math.sqrt(self.dim) if self.sqrt_d else norm
        if self.param == "or":
            magnitude.copy_(m)
            direction.copy_(unit)
        elif self.er_exp == "magnitude":
            magnitude.copy_(m.log())
            direction.copy_(unit)
        else:
            if (value <= 0).any():
                raise ValueError("ER with an elementwise exp cannot represent non-positive gains")
            magnitude.copy_(m.log())
            direction.copy_(value.log())  # exp(α)/‖exp(α)‖ = value/‖value‖

    def _shape(self) -> torch.Size:
        return self.gamma.shape if self.param == "plain" else self.direction.shape

    def _dtype(self) -> torch.dtype:
        return (self.gamma if self.param == "plain" else self.packed).dtype

    def extra_repr(self) -> str:
        return f"{self.slot or 'γ'}: dim={self.dim}, param={self.param}, role={self.role.value}"


def _pack_direction_magnitude(module: ScaleVector, state_dict: dict, prefix: str, *_) -> None:
    """Load a checkpoint that stored OR/ER's α and m as two tensors (``direction``, ``magnitude``)."""
    a, m = prefix + "direction", prefix + "magnitude"
    if a in state_dict and m in state_dict and prefix + "packed" not in state_dict:
        state_dict[prefix + "packed"] = torch.cat([state_dict.pop(a), state_dict.pop(m)], -1)


def make_scale(
    dim: int, param: str, role: Role, scale: ScaleConfig, slot: str, lead: tuple[int, ...] = ()
) -> ScaleVector | None:
    """A scale vector configured from the strategy; ``None`` for ``param='none'``."""
    if param == "none":
        return None
    return ScaleVector(dim, param, slot_role(slot, role, scale), init=scale.init, magnitude=scale.magnitude,
                       sqrt_d=scale.sqrt_d, er_exp=scale.er_exp, lead=lead, slot=slot)


def slot_role(slot: str, default: Role, scale: ScaleConfig) -> Role:
    """A gain's role: ``scale.roles`` overrides it by slot name (``scale.roles={'attn.q.out'='output'}``)."""
    return Role(f"{scale.roles[slot]}_scale") if slot in scale.roles else Role(default)


def gain_name(module: str, slot: str) -> str:
    """The one name of a gain everywhere (``info``, ``metrics.jsonl``, plots): its slot, which is also its
    ``scale.roles`` key, prefixed by its block (``blocks.3.attn.q.in``, ``blocks.0.mlp.gate.out``,
    ``final.in``)."""
    parts = module.split(".")
    return f"blocks.{parts[1]}.{slot}" if len(parts) > 1 and parts[0] == "blocks" else slot


def gain_modules(model: nn.Module) -> Iterator[tuple[str, str, ScaleVector, int | None]]:
    """(name, module path, scale vector, row) for every γ of ``model``, one per branch: ``row`` picks HG's
    branch from a vector whose rows are the branches' input gains (its slot lists theirs), else None."""
    for path, m in model.named_modules():
        if isinstance(m, ScaleVector):
            slots = m.slot.split(",")
            for row, slot in enumerate(slots):
                yield gain_name(path, slot), path, m, (row if len(slots) > 1 else None)


def gains(model: nn.Module) -> Iterator[tuple[str, ScaleVector, int | None]]:
    """(name, scale vector, row) for every γ of ``model``, one per branch, named by ``gain_name``; γ is
    ``vector()`` or, for a row, ``vector()[row]``."""
    for name, _, sv, row in gain_modules(model):
        yield name, sv, row


@torch.no_grad()
def scale_statistics(model: nn.Module) -> dict[str, float]:
    """Mean, std, min and max of every γ in ``model`` (and the mean magnitude for OR/ER), keyed
    ``gamma/<name>/<stat>`` by ``gain_name`` (``gamma/blocks.0.attn.q.in/mean``): the per-site, per-layer
    dynamics the paper uses to motivate HG."""
    out: dict[str, float] = {}
    for name, sv, row in gains(model):
        v = sv().detach().float()
        v = v if row is None else v[row]
        out[f"gamma/{name}/mean"] = v.mean().item()
        out[f"gamma/{name}/std"] = v.std().item() if v.numel() > 1 else 0.0
        out[f"gamma/{name}/min"] = v.min().item()
        out[f"gamma/{name}/max"] = v.max().item()
        if sv.param in ("or", "er"):
            mag = (sv.magnitude if row is None else sv.magnitude[row]).detach().float()
            out[f"gamma/{name}/magnitude"] = (mag.exp() if sv.param == "er" else mag).mean().item()
    return out
