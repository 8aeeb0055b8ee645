"""Building blocks: a norm site with its linear branches ``u ⊙ [Norm] W (v ⊙ x̂)``, attention and MLP.

Where a gain is applied is chosen for cost, not for form: a gain shared by all branches of a site rides in
``F.rms_norm``'s weight (fused, no extra pass over activations); branch-specific input gains and DP output gains
are multiplied into the weight (O(d_out·d_in) per step instead of O(tokens·d) per branch), so HG and DP keep one
fused matmul per site.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from scalevec.roles import Role, tag
from scalevec.scale import ScaleVector, make_scale
from scalevec.strategy import ScaleConfig, SiteSpec


@dataclass(frozen=True)
class BranchDef:
    """One linear branch of a site."""

    name: str
    d_out: int
    # γ_a of this branch feeds a linear map (v -> W_o, up -> W_down): then it is Input-role for IWD.
    out_feeds_linear: bool = False
    norm_group: int = 0  # DNP normalises over groups of this size (head_dim for q/k/v); 0: whole output


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
        shared = spec.shared or len(branches) == 1
        self.in_scale = (
            make_scale(d_in, spec.param, Role.INPUT_SCALE, scale, f"{name}.in") if spec.has_input and shared
            else None
        )
        self.weights = nn.ParameterDict()
        self.in_scales = nn.ModuleDict()
        self.out_scales = nn.ModuleDict()
        for b in branches:
            self.weights[b.name] = weight if weight is not None else matrix(b.d_out, d_in, std, weight_role)
            if spec.has_input and not shared:
                self.in_scales[b.name] = make_scale(d_in, spec.param, Role.INPUT_SCALE, scale,
                                                    f"{name}.{b.name}.in")
            if spec.has_output:
                role = Role.INPUT_SCALE if b.out_feeds_linear else Role.OUTPUT_SCALE
                self.out_scales[b.name] = make_scale(b.d_out, spec.param, role, scale, f"{name}.{b.name}.out")

    def norm(self, x: torch.Tensor) -> torch.Tensor:
        g = self.in_scale() if self.in_scale is not None else None
        return F.rms_norm(x, (self.d_in,), g, self.eps)

    def effective_weight(self, b: BranchDef, fold_output: bool) -> torch.Tensor:
        """W with the branch's own input gain (and, for DP, its output gain) multiplied in."""
        w = self.weights[b.name]
        if b.name in self.in_scales:
            w = w * self.in_scales[b.name]().unsqueeze(0)
        if fold_output and b.name in self.out_scales:
            w = w * self.out_scales[b.name]().unsqueeze(1)
        return w

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = self.norm(x)
        dual = not self.spec.has_norm
        ws = [self.effective_weight(b, fold_output=dual) for b in self.defs]
        w = ws[0] if len(ws) == 1 else torch.cat(ws, 0)
        ys = list(torch.split(F.linear(h, w), self.splits, -1)) if len(ws) > 1 else [F.linear(h, w)]
        if self.spec.has_norm:
            ys = [self._norm_out(b, y) for b, y in zip(self.defs, ys)]
        return ys

    def _norm_out(self, b: BranchDef, y: torch.Tensor) -> torch.Tensor:
        g = b.norm_group or b.d_out
        y = F.rms_norm(y.unflatten(-1, (b.d_out // g, g)), (g,), None, self.eps).flatten(-2)
        if b.name in self.out_scales:
            y = y * self.out_scales[b.name]()
        return y

    @torch.no_grad()
    def folded(self) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
        """{branch: (weight with every foldable gain multiplied in, the output gain a norm keeps or None)}."""
        out = {}
        for b in self.defs:
            w = self.effective_weight(b, fold_output=not self.spec.has_norm)
            if self.in_scale is not None:
                w = w * self.in_scale().unsqueeze(0)
            keep = self.out_scales[b.name]() if self.spec.has_norm and b.name in self.out_scales else None
            out[b.name] = (w.detach().clone(), None if keep is None else keep.detach().clone())
        return out


class OutputNorm(nn.Module):
    """A norm whose output is not read by a linear map (QK-norm, post-branch): its gain is Output-role."""

    def __init__(self, dim: int, param: str, scale: ScaleConfig, eps: float, slot: str):
        super().__init__()
        self.dim, self.eps = dim, eps
        self.gain: ScaleVector | None = make_scale(dim, param, Role.OUTPUT_SCALE, scale, slot)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (self.dim,), self.gain() if self.gain is not None else None, self.eps)


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
        if self.kv != self.h:
            k = k.repeat_interleave(self.h // self.kv, 1)
            v = v.repeat_interleave(self.h // self.kv, 1)
        if causal and k.shape[2] != T:  # prefill into a non-empty cache: explicit causal offset mask
            mask = torch.ones(T, k.shape[2], dtype=torch.bool, device=x.device).tril(k.shape[2] - T)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return F.linear(y.transpose(1, 2).reshape(B, T, self.h * self.hd), self.wo)


class MLP(nn.Module):
    """SwiGLU: W_down (silu(gate) * up), gate and up reading one norm site."""

    def __init__(self, cfg, scale: ScaleConfig, d_ff: int | None = None):
        super().__init__()
        d_ff = d_ff or cfg.d_ff
        self.gate_up = Site(
            "mlp", cfg.d_model, [BranchDef("gate", d_ff, False), BranchDef("up", d_ff, True)],
            scale.mlp, scale, cfg.norm_eps, cfg.init_std,
        )
        self.w_down = matrix(cfg.d_model, d_ff, cfg.init_std / math.sqrt(2 * cfg.n_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x)
        return F.linear(F.silu(gate) * up, self.w_down)
