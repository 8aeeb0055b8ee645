"""Building blocks: a norm site with its linear branches ``u ⊙ [Norm] W (v ⊙ x̂)``, attention and MLP.

Where a gain is applied is chosen for cost, not for form (measurements in ``docs/performance.md``):

- a gain shared by all branches of a site rides in ``F.rms_norm``'s weight (one norm for all branches);
- branch-specific input gains (HG) and DP output gains are multiplied into the weight by ``scaled_weight``
  (O(d_out·d_in) per step instead of O(tokens·d) per branch), so every site stays one fused matmul;
- with DNP on the MLP, γ_up feeds W_down and is multiplied into W_down's columns; the two branch norms, γ_gate
  and SwiGLU run as one op that keeps only what plain SwiGLU keeps (``ops/dnp_swiglu.py``);
- on CPU under bf16 autocast, attention runs in fp32 (torch's CPU flash kernel is faster there in fp32).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from scalevec.ops.dnp_swiglu import dnp_swiglu
from scalevec.roles import Role, tag
from scalevec.scale import ScaleVector, make_scale, slot_role
from scalevec.strategy import ScaleConfig, SiteSpec
from scalevec.typed_config import ConfigError


@dataclass(frozen=True)
class BranchDef:
    """One linear branch of a site."""

    name: str
    d_out: int
    # The branch output feeds a linear map (v -> W_o, up -> W_down), which can absorb its γ_a.
    out_feeds_linear: bool = False
    norm_group: int = 0  # DNP normalises over groups of this size (head_dim for q/k/v); 0: whole output


class _ScaledWeight(torch.autograd.Function):
    """``diag(u) · W · diag(v)`` that keeps only its inputs for backward.

    Autograd's two multiplies would keep ``W · diag(v)``, a weight-sized fp32 tensor per DP branch, alive from
    forward to backward; the gradients recomputed here cost what the multiplies cost anyway."""

    @staticmethod
    def forward(ctx, w: torch.Tensor, v: torch.Tensor | None, u: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(w, v, u)
        if v is not None:
            w = w * v
        if u is not None:
            w = w * u.unsqueeze(-1)
        return w

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        w, v, u = ctx.saved_tensors
        gv = gu = None
        gw = g * w  # d/d(diag(u) W diag(v)) contracted with W: both gain gradients are reductions of it
        if v is not None and ctx.needs_input_grad[1]:
            gv = (gw if u is None else gw * u.unsqueeze(-1)).sum(0)
        if u is not None and ctx.needs_input_grad[2]:
            gu = (gw if v is None else gw * v).sum(1)
        if u is not None:
            g = g * u.unsqueeze(-1)
        if v is not None:
            g = g * v
        return g, gv, gu


def scaled_weight(w: torch.Tensor, v: torch.Tensor | None = None, u: torch.Tensor | None = None) -> torch.Tensor:
    """``diag(u) · W · diag(v)`` for a (d_out, d_in) weight: the input gain v scales columns, the output gain u
    rows. ``W`` itself when both are ``None``."""
    if v is None and u is None:
        return w
    return _ScaledWeight.apply(w, v, u)


def output_gain_role(spec: SiteSpec, feeds_linear: bool) -> Role:
    """IWD's role for a branch's γ_a, by absorbability (docs/paper.md): a gain that can be multiplied into
    an adjacent matrix is Input-role. Without a norm (DP) γ_a folds into W's rows; behind DNP's norm it folds
    only into a linear map that reads the branch, and is otherwise Output-role."""
    return Role.INPUT_SCALE if not spec.has_norm or feeds_linear else Role.OUTPUT_SCALE


class SiteGains(nn.Module):
    """The gains the strategy places at a site: ``in_gain``, the input γ shared by its branches (shape
    ``(d_in,)``) or HG's branch input gains as the rows of one tensor ``(n_branches, *lead, d_in)`` in branch
    order, and ``out_gains``, each branch's own output γ (DP, DNP). ``lead`` gives the branch gains leading
    dimensions (one gain per expert)."""

    def __init__(self, name: str, d_in: int, branches: list[BranchDef], spec: SiteSpec, scale: ScaleConfig,
                 lead: tuple[int, ...] = ()):
        super().__init__()
        self.branches, self.lead = [b.name for b in branches], lead
        self.per_branch_input = spec.has_input and not (spec.shared or len(branches) == 1)  # HG
        self.in_gain = None
        if self.per_branch_input:
            slots = [f"{name}.{b.name}.in" for b in branches]
            roles = {slot_role(s, Role.INPUT_SCALE, scale) for s in slots}
            if len(roles) > 1:  # one tensor has one role (one optimizer group)
                raise ConfigError(f"scale.roles: {', '.join(slots)} are one tensor (HG's rows) and take one role; "
                                  f"got {sorted(r.value for r in roles)}")
            self.in_gain = make_scale(d_in, spec.param, roles.pop(), scale, ",".join(slots),
                                      lead=(len(branches), *lead))
        elif spec.has_input:
            self.in_gain = make_scale(d_in, spec.param, Role.INPUT_SCALE, scale, f"{name}.in")
        self.out_gains = nn.ModuleDict()
        if spec.has_output:
            for b in branches:
                self.out_gains[b.name] = make_scale(b.d_out, spec.param, output_gain_role(spec, b.out_feeds_linear),
                                                    scale, f"{name}.{b.name}.out", lead=lead)

    def shared_input(self) -> torch.Tensor | None:
        """The input γ every branch reads, applied by the norm; None with HG or without an input gain."""
        return self.in_gain() if self.in_gain is not None and not self.per_branch_input else None

    def inputs(self) -> dict[str, torch.Tensor]:
        """HG: every branch's own input γ, the rows of ``in_gain`` (one forward for all); else empty."""
        if not self.per_branch_input:
            return {}
        rows = self.in_gain()
        # Rows by indexing (a view the compiled backward recomputes) rather than ``unbind``, whose outputs the
        # partitioner saves as more inputs of the compiled backward.
        return {b: rows[i] for i, b in enumerate(self.branches)}

    def outputs(self) -> dict[str, torch.Tensor]:
        """Every branch's output γ (DP, DNP); empty without output gains."""
        return {b: g() for b, g in self.out_gains.items()}

    def extra_repr(self) -> str:
        return f"branches={self.branches}, per_branch_input={self.per_branch_input}"


def load_gains_beside_weights(owner: nn.Module, state_dict: dict, base: str, *_) -> None:
    """A load-state-dict pre-hook for the module that holds a ``SiteGains`` as ``gains`` (a site, an MoE layer):
    loads a checkpoint that kept the gains beside the weights, ``in_scale`` (shared), ``in_scales`` and
    ``out_scales``, with branch gains of equal size and role as the rows of one tensor named by its branches
    joined with ``_`` (``out_scales.k_v``), or one tensor per branch (``out_scales.q``)."""
    module: SiteGains = owner.gains
    prefix = base + "gains."
    branch: dict[tuple[str, str, str], torch.Tensor] = {}  # (place, branch, tensor name) -> its tensor
    for key in [k for k in state_dict if k.startswith(base)]:
        parts = key[len(base):].split(".")
        if parts[0] == "in_scale" and len(parts) == 2:
            state_dict[f"{prefix}in_gain.{parts[1]}"] = state_dict.pop(key)
        elif parts[0] in ("in_scales", "out_scales") and len(parts) == 3:
            t, names = state_dict.pop(key), parts[1].split("_")
            if t.dim() == len(module.lead) + 2 and t.shape[0] == len(names):  # rows of a group
                rows = list(t)
            elif t.dim() == len(module.lead) + 1 and len(names) == 1:  # one tensor per branch
                rows = [t]
            else:
                raise ValueError(f"{key}: shape {tuple(t.shape)} is neither a row per branch of {names} (the layout "
                                 f"with grouped branch gains) nor one branch's gain; this layout keeps "
                                 f"{prefix}in_gain and {prefix}out_gains.<branch>")
            branch.update({(parts[0], b, parts[2]): r for b, r in zip(names, rows)})
    for (place, b, name), t in branch.items():
        if place == "out_scales":
            state_dict[f"{prefix}out_gains.{b}.{name}"] = t
    for name in {n for place, _, n in branch if place == "in_scales"}:
        missing = [b for b in module.branches if ("in_scales", b, name) not in branch]
        if missing:
            raise ValueError(f"{base}in_scales: no {name} for branch(es) {missing} (the layout with grouped branch "
                             f"gains); this layout keeps every branch's input gain as a row of {prefix}in_gain")
        state_dict[f"{prefix}in_gain.{name}"] = torch.stack([branch["in_scales", b, name] for b in module.branches])


def matrix(d_out: int, d_in: int, std: float, role: Role = Role.MATRIX) -> nn.Parameter:
    return tag(nn.Parameter(torch.randn(d_out, d_in) * std), role)


class Site(nn.Module):
    """An Input-Norm and the linear branches that read it, with the gains the strategy places there."""

    def __init__(
        self,
        name: str,
        d_in: int,
        branches: list[BranchDef],
        spec: SiteSpec,
        scale: ScaleConfig,
        eps: float,
        std: float,
        weight: nn.Parameter | None = None,  # an existing weight (tied LM head) for a single branch
        weight_role: Role = Role.MATRIX,
    ):
        super().__init__()
        self.name, self.d_in, self.eps, self.spec = name, d_in, eps, spec
        self.defs = branches
        self.splits = [b.d_out for b in branches]
        # Before the weights, where the shared input gain always was: each role's optimizer group, and the
        # parameter list that clipping's total norm sums over, see the gains in the order they always had.
        self.gains = SiteGains(name, d_in, branches, spec, scale)
        self.register_load_state_dict_pre_hook(load_gains_beside_weights)
        self.weights = nn.ParameterDict()
        for b in branches:
            self.weights[b.name] = weight if weight is not None else matrix(b.d_out, d_in, std, weight_role)

    def norm(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (self.d_in,), self.gains.shared_input(), self.eps)

    def effective_weights(self, fold_output: bool) -> list[torch.Tensor]:
        """Every branch's W with its own input gain (and, for DP, its output gain) multiplied in."""
        v = self.gains.inputs()
        u = self.gains.outputs() if fold_output else {}
        return [scaled_weight(self.weights[b.name], v.get(b.name), u.get(b.name)) for b in self.defs]

    def project(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every branch's ``W (v ⊙ x̂)`` (with DP's γ_a in W), before any norm on the branch outputs: one norm
        and one matmul for all branches."""
        if len(self.defs) == 1:
            return [self.project_joint(x)]
        return list(torch.split(self.project_joint(x), self.splits, -1))

    def project_joint(self, x: torch.Tensor) -> torch.Tensor:
        """``project``'s branch outputs side by side along the last dimension, as the one matmul makes them."""
        h = self.norm(x)
        ws = self.effective_weights(fold_output=not self.spec.has_norm)
        return F.linear(h, ws[0] if len(ws) == 1 else torch.cat(ws, 0))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        ys = self.project(x)
        if self.spec.has_norm:
            gains = self.gains.outputs()
            ys = [self._norm_out(b, y, gains.get(b.name)) for b, y in zip(self.defs, ys)]
        return ys

    def _norm_out(self, b: BranchDef, y: torch.Tensor, gain: torch.Tensor | None) -> torch.Tensor:
        # γ_a in y's dtype: an fp32 gain would promote a bf16 branch (and everything after it) to fp32.
        gain = gain.to(y.dtype) if gain is not None else None
        g = b.norm_group or b.d_out
        if g == b.d_out:
            return F.rms_norm(y, (g,), gain, self.eps)
        y = F.rms_norm(y.unflatten(-1, (b.d_out // g, g)), (g,), None, self.eps).flatten(-2)
        return y if gain is None else y * gain

    @torch.no_grad()
    def folded(self) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
        """{branch: (weight with every foldable gain multiplied in, the output gain a norm keeps or None)}."""
        ws = self.effective_weights(fold_output=not self.spec.has_norm)
        keep = self.gains.outputs() if self.spec.has_norm else {}
        shared = self.gains.shared_input()
        out = {}
        for b, w in zip(self.defs, ws):
            if shared is not None:
                w = w * shared.unsqueeze(0)
            k = keep.get(b.name)
            out[b.name] = (w.detach().clone(), None if k is None else k.detach().clone())
        return out


class OutputNorm(nn.Module):
    """A norm whose output is not read by a linear map (QK-norm, post-branch): its gain is Output-role."""

    def __init__(self, dim: int, param: str, scale: ScaleConfig, eps: float, slot: str):
        super().__init__()
        self.dim, self.eps = dim, eps
        self.gain: ScaleVector | None = make_scale(dim, param, Role.OUTPUT_SCALE, scale, slot)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The gain in x's dtype: rms_norm has no mixed-dtype kernel (a bf16 branch output under autocast).
        return F.rms_norm(x, (self.dim,), self.gain().to(x.dtype) if self.gain is not None else None, self.eps)


def rope_tables(head_dim: int, seq_len: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    f = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv)
    return f.cos(), f.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (first half, second half) of each head: x is (B, H, T, hd), cos/sin are (T, hd/2)."""
    x1, x2 = x.chunk(2, -1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), -1)


class Attention(nn.Module):
    def __init__(self, cfg, scale: ScaleConfig, layer: int):
        super().__init__()
        hd, h, kv = cfg.head_dim, cfg.n_heads, cfg.kv_heads
        self.h, self.kv, self.hd = h, kv, hd
        self.qkv = Site(
            "attn", cfg.d_model,
            [BranchDef("q", h * hd, False, hd), BranchDef("k", kv * hd, False, hd),
             BranchDef("v", kv * hd, True, hd)],
            scale.attn, scale, cfg.norm_eps, cfg.init_std,
        )
        self.q_norm = OutputNorm(hd, scale.qk_norm, scale, cfg.norm_eps, "qk_norm.q") if cfg.qk_norm else None
        self.k_norm = OutputNorm(hd, scale.qk_norm, scale, cfg.norm_eps, "qk_norm.k") if cfg.qk_norm else None
        self.wo = matrix(cfg.d_model, h * hd, cfg.init_std / math.sqrt(2 * cfg.n_layers))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache=None) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.qkv(x)
        # CPU under bf16 autocast: attention (QK-norm, RoPE, SDPA) in fp32, where torch's CPU flash-attention
        # kernel is faster than in bf16; the projections stay bf16.
        fp32 = x.device.type == "cpu" and torch.is_autocast_enabled("cpu")
        if fp32:
            q, k, v = q.float(), k.float(), v.float()
        q = q.view(B, T, self.h, self.hd)
        k = k.view(B, T, self.kv, self.hd)
        v = v.view(B, T, self.kv, self.hd)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        causal = True
        if cache is not None:
            k, v = cache.update(k, v)
            causal = T > 1  # a single new token attends to the whole cache
        mask = None
        if causal and k.shape[2] != T:  # prefill into a non-empty cache: explicit causal offset mask
            mask = torch.ones(T, k.shape[2], dtype=torch.bool, device=x.device).tril(k.shape[2] - T)
            causal = False
        with torch.autocast("cpu", enabled=False) if fp32 else contextlib.nullcontext():
            # GQA: SDPA broadcasts each K/V head over its query heads (no copies of K and V)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                               enable_gqa=self.kv != self.h)
        return F.linear(y.transpose(1, 2).reshape(B, T, self.h * self.hd), self.wo)


class MLP(nn.Module):
    """SwiGLU: W_down (silu(gate) * up), gate and up reading one norm site.

    With DNP (a norm on the branch outputs), γ_up is multiplied into W_down's columns, where it acts anyway
    (O(d·d_ff) per step instead of O(tokens·d_ff)), and the norms, γ_gate and SwiGLU run as ``dnp_swiglu``.
    """

    def __init__(self, cfg, scale: ScaleConfig, d_ff: int | None = None):
        super().__init__()
        d_ff = d_ff or cfg.d_ff
        self.gate_up = Site(
            "mlp", cfg.d_model, [BranchDef("gate", d_ff, False), BranchDef("up", d_ff, True)],
            scale.mlp, scale, cfg.norm_eps, cfg.init_std,
        )
        self.w_down = matrix(cfg.d_model, d_ff, cfg.init_std / math.sqrt(2 * cfg.n_layers))
        # DNP ("up" has its γ_a too); ``ops.dnp_swiglu.enable`` looks for this flag.
        self.uses_dnp_swiglu = self.gate_up.spec.has_norm and "gate" in self.gate_up.gains.out_gains

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        site = self.gate_up
        if self.uses_dnp_swiglu:
            g = site.gains.outputs()
            h = dnp_swiglu(site.project_joint(x), g["gate"], site.eps)  # [gate | up] in
            return F.linear(h, scaled_weight(self.w_down, g["up"]))
        gate, up = site(x)
        return F.linear(F.silu(gate) * up, self.w_down)
