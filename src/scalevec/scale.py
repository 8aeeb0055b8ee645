"""Scale vectors: the learnable gains of normalization layers, in three parameterisations.

``plain``: γ itself. ``or``: γ = m · √d · α/‖α‖ (magnitude in the original space). ``er``: the same with
m = exp(b) (magnitude in exponential space). All three equal ``init`` at initialisation (docs/paper.md).
Options: a vector magnitude instead of a scalar, no √d factor, and an elementwise exp on the direction for ER.

Every gain is stored as one parameter tensor: OR/ER keep α and m side by side in ``packed``, and a site's
branch-specific gains of equal size and role are the rows of one ``ScaleVector`` (``BranchGains``). The
function and the AdamW update are those of separate tensors (AdamW and weight decay act elementwise, OR/ER
normalise each row on its own); fewer tensors cut the per-tensor costs of the optimizer, clipping and the
compiled step's inputs. Checkpoints written with separate tensors load through state-dict hooks.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import nn

from scalevec.roles import Role, tag
from scalevec.strategy import ScaleConfig


class ScaleVector(nn.Module):
    """A gain of size ``dim`` (or ``(*lead, dim)``: per-expert gains, a site's branch rows) with a role fixed at
    construction."""

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


class BranchGain:
    """One branch's γ in a ``BranchGains``: row ``row`` of a grouped ``ScaleVector``. Not a module (the
    parameter belongs to the group); call it for γ, ``set_value`` to write it."""

    __slots__ = ("row", "vector")

    def __init__(self, vector: ScaleVector, row: int):
        self.vector, self.row = vector, row

    def __call__(self) -> torch.Tensor:
        return self.vector()[self.row]

    def set_value(self, value: torch.Tensor) -> None:
        self.vector.set_value(value, row=self.row)

    @property
    def param(self) -> str:
        return self.vector.param

    @property
    def dim(self) -> int:
        return self.vector.dim

    @property
    def role(self) -> Role:
        return self.vector.role

    @property
    def slot(self) -> str:
        return self.vector.slot.split(",")[self.row]


class BranchGains(nn.Module):
    """The branch-specific gains at one place of a site (HG's input gains, DP/DNP's output gains): one
    ``ScaleVector`` per group of branches with equal size and role, whose rows are the branches' γ in branch
    order. The group's submodule is named by its branches joined with ``_`` (``q_k_v``); ``gains[b]`` is
    branch ``b``'s ``BranchGain`` and ``gammas()`` computes every γ with one forward per group."""

    def __init__(self, members: list[tuple[str, int, Role, str]], param: str, scale: ScaleConfig,
                 lead: tuple[int, ...] = ()):
        """``members``: (branch, size, default role, slot) for each branch that has a gain here; ``scale.roles``
        overrides a slot's role, as for single gains."""
        super().__init__()
        groups: dict[tuple[int, Role], list[tuple[str, str]]] = {}
        for branch, dim, role, slot in members:
            if "_" in branch:
                raise ValueError(f"branch name {branch!r}: '_' joins branch names in group names")
            groups.setdefault((dim, slot_role(slot, role, scale)), []).append((branch, slot))
        self._rows: dict[str, tuple[str, int]] = {}
        for (dim, role), group in groups.items():
            key = "_".join(b for b, _ in group)
            self.add_module(key, make_scale(dim, param, role, scale, ",".join(s for _, s in group),
                                            lead=(len(group), *lead)))
            self._rows.update({b: (key, i) for i, (b, _) in enumerate(group)})
        self.register_load_state_dict_pre_hook(self._stack_branches)

    def __contains__(self, branch: str) -> bool:
        return branch in self._rows

    def __len__(self) -> int:
        return len(self._rows)

    def __iter__(self) -> Iterator[str]:
        return iter(self._rows)

    def keys(self) -> list[str]:
        return list(self._rows)

    def __getitem__(self, branch: str) -> BranchGain:
        key, row = self._rows[branch]
        return BranchGain(self.get_submodule(key), row)

    def items(self) -> list[tuple[str, BranchGain]]:
        return [(b, self[b]) for b in self._rows]

    def gammas(self) -> dict[str, torch.Tensor]:
        """Every branch's γ, each group's forward run once."""
        whole = {key: sv() for key, sv in self.named_children()}
        # Rows by indexing (a view the compiled backward recomputes) rather than ``unbind``, whose outputs the
        # partitioner saves as more inputs of the compiled backward.
        return {b: whole[key][i] for b, (key, i) in self._rows.items()}

    def _stack_branches(self, module: nn.Module, state_dict: dict, prefix: str, *_) -> None:
        """Load a checkpoint whose branches were grouped otherwise: one tensor per branch (``q.gamma``,
        ``q.direction``), or groups of other members (``k`` and ``v`` apart, before their roles agreed)."""
        stored: dict[tuple[str, str], tuple[str, int]] = {}  # (branch, tensor name) -> (key, row in it)
        for k in state_dict:
            rest = k[len(prefix):].split(".") if k.startswith(prefix) else []
            if len(rest) == 2:
                for i, b in enumerate(rest[0].split("_")):
                    if b in self._rows:
                        stored[b, rest[1]] = (k, i)
        used: set[str] = set()
        written: set[str] = set()
        for key, sv in self.named_children():
            rank = next(sv.parameters()).dim()
            branches = [b for b, (k, _) in self._rows.items() if k == key]
            for name in ("gamma", "packed", "direction", "magnitude"):
                current = state_dict.get(f"{prefix}{key}.{name}")
                if (current is not None and current.dim() == rank) or not all((b, name) in stored for b in branches):
                    continue
                rows = []
                for b in branches:
                    k, i = stored[b, name]
                    rows.append(state_dict[k] if state_dict[k].dim() == rank - 1 else state_dict[k][i])
                    used.add(k)
                state_dict[f"{prefix}{key}.{name}"] = torch.stack(rows)
                written.add(f"{prefix}{key}.{name}")
        for k in used - written:
            del state_dict[k]

    def extra_repr(self) -> str:
        return ", ".join(f"{b}: {k}[{i}]" for b, (k, i) in self._rows.items())


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


def gain_modules(model: nn.Module) -> Iterator[tuple[str, str, ScaleVector | BranchGain]]:
    """(name, module path, gain) for every γ of ``model``, one per branch; the path is where the parameter
    lives (``blocks.0.attn.qkv.in_scales.q`` is row ``q`` of the ``in_scales`` group)."""
    inside: list[str] = []
    for path, m in model.named_modules():
        if isinstance(m, BranchGains):
            inside.append(path + ".")
            for b, g in m.items():
                yield gain_name(path, g.slot), f"{path}.{b}", g
        elif isinstance(m, ScaleVector) and not any(path.startswith(p) for p in inside):
            yield gain_name(path, m.slot), path, m


def gains(model: nn.Module) -> Iterator[tuple[str, ScaleVector | BranchGain]]:
    """(name, gain) for every γ of ``model``, one per branch, named by ``gain_name``."""
    for name, _, g in gain_modules(model):
        yield name, g


@torch.no_grad()
def scale_statistics(model: nn.Module) -> dict[str, float]:
    """Mean, std, min and max of every γ in ``model`` (and the mean magnitude for OR/ER), keyed
    ``gamma/<name>/<stat>`` by ``gain_name`` (``gamma/blocks.0.attn.q.in/mean``): the per-site, per-layer
    dynamics the paper uses to motivate HG."""
    out: dict[str, float] = {}
    for name, g in gains(model):
        v = g().detach().float()
        out[f"gamma/{name}/mean"] = v.mean().item()
        out[f"gamma/{name}/std"] = v.std().item() if v.numel() > 1 else 0.0
        out[f"gamma/{name}/min"] = v.min().item()
        out[f"gamma/{name}/max"] = v.max().item()
        if g.param in ("or", "er"):
            sv, row = (g.vector, g.row) if isinstance(g, BranchGain) else (g, None)
            mag = (sv.magnitude if row is None else sv.magnitude[row]).detach().float()
            out[f"gamma/{name}/magnitude"] = (mag.exp() if g.param == "er" else mag).mean().item()
    return out
