"""Mixture-of-experts feed-forward: dropless token-choice top-k routing over batched SwiGLU experts.

One Input-Norm feeds the router and every expert (docs/paper.md). The strategy's ``mlp`` site describes
the expert branches (gate, up) exactly as for the dense MLP: a gain shared by all readers rides in the norm's
weight; HG input gains, DP output gains (and, per expert, any gain) are multiplied into the expert weights, so
gate and up stay one grouped matmul; DNP normalises each expert's branch output before its γ_a. The
``router`` site gives the router its own input gain with HG (``shared = False``) and an output gain on the
logits with ``dual``. ``scale.expert_gains = "per_expert"`` gives every expert its own branch gains.

Dispatch is sort-based (``dispatch.py``): the (token, slot) assignments are sorted by expert and run through
``F.grouped_mm``, one call per projection, no capacity, no host sync.
Shared experts are extra experts that every token visits with weight 1, so they share the batched weights, the
grouped matmul and Muon's per-expert orthogonalisation.

Load balancing: the Switch/GShard auxiliary loss, the router z-loss (both in ``last_aux_loss``, which the
decoder's ``aux_loss()`` sums) and DeepSeek-V3's auxiliary-loss-free bias, a buffer that only shifts which
experts are selected and is updated outside the gradient by ``after_optimizer_step``.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from scalevec.layers import MLP, BranchDef, SiteGains, load_gains_beside_weights
from scalevec.models.config import ModelConfig
from scalevec.models.dispatch import CPU_GROUP_ROWS, SortedRows, expert_groups
from scalevec.ops.dnp_swiglu import dnp_swiglu
from scalevec.roles import Role, tag
from scalevec.scale import make_scale
from scalevec.strategy import ScaleConfig

BRANCHES = ("gate", "up")


def moe_factory(cfg: ModelConfig):
    """The decoder's ``ffn_factory``: dense MLP in the first ``moe.first_dense`` layers, MoE after."""

    def make(cfg: ModelConfig, scale: ScaleConfig, layer: int) -> nn.Module:
        return MLP(cfg, scale) if layer < cfg.moe.first_dense else MoE(cfg, scale, layer)

    return make


class MoE(nn.Module):
    """``y = Σ_{e ∈ topk(x)} w_e · E_e(x̂) + Σ_shared E_s(x̂)`` with ``E(x̂) = W_down(silu(gate) * up)``."""

    def __init__(self, cfg: ModelConfig, scale: ScaleConfig, layer: int = 0):
        super().__init__()
        m = cfg.moe
        self.layer, self.eps = layer, cfg.norm_eps
        self.d_model, self.d_expert = cfg.d_model, m.d_expert or cfg.d_ff
        self.num_experts, self.num_shared, self.top_k = m.num_experts, m.num_shared, m.top_k
        self.n_slots = m.num_experts + m.num_shared  # routed experts first, then the shared ones
        self.score, self.renorm, self.route_scale = m.score, m.renorm, m.route_scale
        self.aux_coef, self.aux_scope, self.z_coef, self.bias_rate = m.aux_coef, m.aux_scope, m.z_coef, m.bias_rate
        spec, rspec = scale.mlp, scale.router
        self.has_norm = spec.has_norm  # DNP on the expert branches
        d, de, n = self.d_model, self.d_expert, self.n_slots

        lead = (n,) if scale.expert_gains == "per_expert" else ()
        branches = [BranchDef("gate", de), BranchDef("up", de, out_feeds_linear=True)]
        self.gains = SiteGains("mlp", d, branches, spec, scale, lead)
        self.register_load_state_dict_pre_hook(load_gains_beside_weights)
        self.per_expert_gains = bool(lead)
        self.router_in = make_scale(d, rspec.param, Role.INPUT_SCALE, scale, "router.in") \
            if rspec.has_input and not rspec.shared else None
        # The router's γ_a folds into its rows (no norm over router logits): Input-role.
        self.router_out = make_scale(m.num_experts, rspec.param, Role.INPUT_SCALE, scale, "router.out") \
            if rspec.has_output else None

        # DNP with gains shared by the experts runs the dense MLP's ``dnp_swiglu`` (per-expert γ_gate does not).
        self.uses_dnp_swiglu = self.has_norm and "gate" in self.gains.out_gains and not lead

        std = cfg.init_std
        self.router = tag(nn.Parameter(torch.randn(m.num_experts, d) * std), Role.ROUTER)
        self.w_gate = _experts(n, de, d, std)
        self.w_up = _experts(n, de, d, std)
        self.w_down = _experts(n, d, de, std / math.sqrt(2 * cfg.n_layers))

        self.register_buffer("expert_bias", torch.zeros(m.num_experts))  # persistent: part of a checkpoint
        # Routed assignments since the last bias update (training forwards only).
        self.register_buffer("bias_counts", torch.zeros(m.num_experts, dtype=torch.long), persistent=False)
        # Eval-mode statistics since the last ``eval_metrics``: load, Σ balance loss, Σ z-loss, forwards.
        self.register_buffer("stat_load", torch.zeros(m.num_experts, dtype=torch.long), persistent=False)
        self.register_buffer("stat_losses", torch.zeros(2), persistent=False)
        self.register_buffer("stat_calls", torch.zeros((), dtype=torch.long), persistent=False)
        self.last_aux_loss: torch.Tensor | None = None
        self.cpu_group_rows = CPU_GROUP_ROWS

    # ---- weights with the strategy's gains ------------------------------------------------------------------

    def branch_weights(self, fold_output: bool) -> dict[str, torch.Tensor]:
        """{branch: (n, d_expert, d_model) W with the branch's own input gain (and, for DP, its output gain)}."""
        v = self.gains.inputs()
        u = self.gains.outputs() if fold_output else {}
        out = {}
        for b in BRANCHES:
            w = self.w_gate if b == "gate" else self.w_up
            if b in v:
                w = w * v[b].unsqueeze(-2)
            if b in u:
                w = w * u[b].unsqueeze(-1)
            out[b] = w
        return out

    def router_weight(self) -> torch.Tensor:
        w = self.router
        if self.router_in is not None:
            w = w * self.router_in().unsqueeze(0)
        if self.router_out is not None:
            w = w * self.router_out().unsqueeze(1)
        return w

    # ---- forward --------------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, d = x.shape
        h = F.rms_norm(x, (d,), self.gains.shared_input(), self.eps)
        h = h.reshape(B * T, d)
        logits, scores, idx, weights = self.route(h)
        balance = self._balance_loss(scores, idx, B)
        z = torch.logsumexp(logits, -1).square().mean()
        loss = None
        if self.aux_coef or self.z_coef:
            loss = self.aux_coef * balance + self.z_coef * z
        self.last_aux_loss = loss
        self._record(idx, balance.detach(), z.detach())
        if self.num_shared:  # shared experts: every token, weight 1
            shared = torch.arange(self.num_experts, self.n_slots, device=x.device).expand(B * T, -1)
            idx = torch.cat([idx, shared], 1)
            weights = torch.cat([weights, weights.new_ones(B * T, self.num_shared)], 1)
        return self.experts(h, idx, weights).view(B, T, d)

    def route(self, h: torch.Tensor):
        """Router logits and scores in fp32; the top-k expert ids (bias-shifted selection) and their weights."""
        with torch.autocast(h.device.type, enabled=False):
            logits = F.linear(h.float(), self.router_weight().float())
        scores = logits.softmax(-1) if self.score == "softmax" else logits.sigmoid()
        select = scores + self.expert_bias if self.bias_rate else scores
        idx = select.topk(self.top_k, -1).indices
        weights = scores.gather(1, idx)
        if self.renorm:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return logits, scores, idx, weights * self.route_scale

    def experts(self, h: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Σ_j weights[:, j] · E_{idx[:, j]}(h): every (token, slot) pair computed, grouped by expert."""
        N, K = idx.shape
        flat = idx.flatten()
        eid, order = flat.sort(stable=True)
        counts = torch.zeros(self.n_slots, dtype=torch.long, device=h.device).scatter_add_(
            0, flat, torch.ones_like(flat))
        dtype = torch.get_autocast_dtype(h.device.type) if torch.is_autocast_enabled(h.device.type) else h.dtype
        inv = torch.empty_like(order).scatter_(0, order, torch.arange(N * K, device=h.device))
        xs = SortedRows.apply(h, order, inv, K).to(dtype)  # rows sorted by expert
        groups = expert_groups(counts, eid, dtype, (self.d_model, self.d_expert), self.cpu_group_rows)
        w_gu = torch.cat(list(self.branch_weights(fold_output=not self.has_norm).values()), 1).to(dtype)
        # Row-wise ops run on the padded layout (zero rows in, zero rows out): no unpad/pad between the projections.
        gate_up = groups.mm_padded(groups.pad(xs), w_gu)
        g = self.gains.outputs() if self.has_norm else {}
        if self.uses_dnp_swiglu:  # as in the dense MLP: γ_up in W_down's columns, the rest in one row-wise op
            z, w_down = dnp_swiglu(gate_up, g["gate"], self.eps), self.w_down * g["up"]
        elif not self.has_norm:
            gate, up = gate_up.split(self.d_expert, -1)
            z, w_down = F.silu(gate) * up, self.w_down
        else:  # per-expert DNP gains: each row needs its expert's γ, so these run on the unpadded rows
            gate, up = groups.unpad(gate_up).split(self.d_expert, -1)
            gate, up = self._norm_out(gate, g.get("gate"), eid), self._norm_out(up, g.get("up"), eid)
            z, w_down = groups.pad(F.silu(gate) * up), self.w_down
        ys = groups.unpad(groups.mm_padded(z.to(dtype), w_down.to(dtype)))
        ys = SortedRows.apply(ys, inv, order, 1).view(N, K, -1)  # back to (token, slot) order
        return torch.bmm(weights.to(ys.dtype).unsqueeze(1), ys).squeeze(1)

    def _norm_out(self, y: torch.Tensor, g: torch.Tensor | None, eid: torch.Tensor) -> torch.Tensor:
        y = F.rms_norm(y, (self.d_expert,), None, self.eps)
        if g is None:
            return y
        return y * (g.index_select(0, eid) if self.per_expert_gains else g)

    def _balance_loss(self, scores: torch.Tensor, idx: torch.Tensor, batch: int) -> torch.Tensor:
        """Switch/GShard ``E · Σ_e f_e P_e``: 1 for uniform routing, larger when load concentrates.

        ``f_e`` is the share of routed assignments (no gradient), ``P_e`` the mean normalised score; per
        micro-batch, or per sequence and then averaged (DeepSeek-V3's sequence-wise variant).
        """
        E = self.num_experts
        probs = scores if self.score == "softmax" else scores / (scores.sum(-1, keepdim=True) + 1e-20)
        groups = 1 if self.aux_scope == "micro_batch" else batch
        per_group = idx.shape[0] // groups
        seg = torch.arange(groups, device=idx.device).repeat_interleave(per_group)
        key = (seg.unsqueeze(1) * E + idx).flatten()
        counts = probs.new_zeros(groups * E).scatter_add_(0, key, probs.new_ones(key.shape))
        f = counts.view(groups, E) / (per_group * self.top_k)
        P = probs.view(groups, per_group, E).mean(1)
        return E * (f * P).sum(-1).mean()

    @torch.no_grad()
    def _record(self, idx: torch.Tensor, balance: torch.Tensor, z: torch.Tensor) -> None:
        """Accumulate load on device (no host sync): for the bias while training, for metrics in eval."""
        if self.training and not self.bias_rate:
            return
        flat = idx.flatten()
        load = torch.zeros_like(self.stat_load).scatter_add_(0, flat, torch.ones_like(flat))
        if self.training:
            self.bias_counts.add_(load)
            return
        self.stat_load.add_(load)
        self.stat_losses.add_(torch.stack([balance, z]).to(self.stat_losses.dtype))
        self.stat_calls.add_(1)

    # ---- hooks the trainer calls ----------------------------------------------------------------------------

    @torch.no_grad()
    def after_optimizer_step(self, rate: float | None = None) -> None:
        """Aux-loss-free balancing: raise the bias of underloaded experts, lower it for overloaded ones.

        Counts are summed over ranks first, so every replica applies the same update. The bias is re-centred
        (selection is invariant to a common shift) so it cannot drift. ``rate`` overrides ``moe.bias_rate``
        (the bias only steers selection when ``moe.bias_rate > 0``).
        """
        rate = self.bias_rate if rate is None else rate
        if not self.bias_rate:
            return
        counts = self.bias_counts
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(counts)
        c = counts.float()
        self.expert_bias.add_(rate * torch.sign(c.mean() - c))
        self.expert_bias.sub_(self.expert_bias.mean())
        counts.zero_()

    @torch.no_grad()
    def load_stats(self, reset: bool = True) -> dict[str, float] | None:
        """Eval-mode routing statistics since the last reset (``None`` if no eval forward ran)."""
        calls = int(self.stat_calls)
        if calls == 0:
            return None
        frac = self.stat_load.double() / self.stat_load.sum()
        balance, z = (self.stat_losses / calls).tolist()
        out = {"load": frac.tolist(), "load_cv": (frac.std(unbiased=False) / frac.mean()).item(),
               "max_vio": (frac.max() * self.num_experts - 1).item(), "balance_loss": balance, "z_loss": z,
               "aux_loss": self.aux_coef * balance + self.z_coef * z}
        if reset:
            self.stat_load.zero_()
            self.stat_losses.zero_()
            self.stat_calls.zero_()
        return out

    def eval_metrics(self) -> dict[str, float | list[float]]:
        """This layer on the held-out set: load per expert, its CV and max violation, the aux losses."""
        s = self.load_stats(reset=True)
        return {} if s is None else {f"moe/{self.layer}/{k}": v for k, v in s.items()}

    # ---- folding and accounting -----------------------------------------------------------------------------

    @torch.no_grad()
    def fold_into(self, dst: MoE) -> None:
        """Copy into ``dst`` (built with the folded strategy) with every foldable gain multiplied in."""
        g = self.gains.shared_input()
        for b, w in self.branch_weights(fold_output=not self.has_norm).items():
            getattr(dst, f"w_{b}").copy_(w if g is None else w * g)
            if self.has_norm and b in self.gains.out_gains:
                dst.gains.out_gains[b].set_value(self.gains.out_gains[b]())
        dst.w_down.copy_(self.w_down)
        r = self.router_weight()
        dst.router.copy_(r if g is None else r * g)

    def inactive_params(self) -> int:
        """Parameters a token does not touch: the unselected routed experts' share of every per-expert tensor."""
        per_expert = [self.w_gate, self.w_up, self.w_down]
        if self.per_expert_gains:  # branch gains carry an expert dimension; a shared input gain does not
            per_expert += [*self.gains.out_gains.parameters()]
            if self.gains.per_branch_input:
                per_expert += [*self.gains.in_gain.parameters()]
        return sum(p.numel() // self.n_slots * (self.num_experts - self.top_k) for p in per_expert)

    def extra_repr(self) -> str:
        return (f"experts={self.num_experts}, shared={self.num_shared}, top_k={self.top_k}, "
                f"d_expert={self.d_expert}, score={self.score}, dnp={self.has_norm}")


def _experts(n: int, d_out: int, d_in: int, std: float) -> nn.Parameter:
    return tag(nn.Parameter(torch.randn(n, d_out, d_in) * std), Role.EXPERT_MATRIX)



# ---- model-level helpers for the trainer and ``scalevec info`` ------------------------------------------------


def moe_layers(model: nn.Module) -> list[MoE]:
    """Every MoE layer of a (possibly wrapped or compiled) model, in depth order."""
    return [m for m in model.modules() if isinstance(m, MoE)]


def update_expert_bias(model: nn.Module, rate: float | None = None) -> None:
    """One aux-loss-free bias update on every MoE layer: the trainer's per-module hook, for custom loops."""
    for m in moe_layers(model):
        m.after_optimizer_step(rate)


def expert_load_metrics(model: nn.Module, reset: bool = True) -> dict[str, float]:
    """Held-out routing statistics averaged over MoE layers (worst layer for CV and max violation)."""
    stats = [s for m in moe_layers(model) if (s := m.load_stats(reset)) is not None]
    if not stats:
        return {}

    def mean(k: str) -> float:
        return sum(s[k] for s in stats) / len(stats)

    return {"moe/load_cv": mean("load_cv"), "moe/load_cv_max": max(s["load_cv"] for s in stats),
            "moe/max_vio": max(s["max_vio"] for s in stats), "moe/balance_loss": mean("balance_loss"),
            "moe/z_loss": mean("z_loss"), "moe/aux_loss": sum(s["aux_loss"] for s in stats)}


def active_params(model: nn.Module) -> dict[str, int]:
    """Parameters one token uses: ``active`` and ``active_non_embedding`` (the MoE ladder's x-axis)."""
    from scalevec.roles import param_roles

    roles = param_roles(model)
    params = dict(model.named_parameters())
    embedding = sum(params[n].numel() for n, r in roles.items() if r in (Role.EMBEDDING, Role.HEAD))
    total = sum(p.numel() for p in params.values())
    active = total - sum(m.inactive_params() for m in moe_layers(model))
    return {"active": active, "active_non_embedding": active - embedding}
