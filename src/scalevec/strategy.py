"""Where scale vectors live: one typed description that every layer consumes.

A *site* is a norm followed by one or more linear *branches* (attention q/k/v; MLP gate/up; the MoE router and
expert gate/up; the LM head after the final norm). For each site the strategy says where its gains sit
(``placement``), whether branches share the input gain (``shared``; ``False`` is the paper's HG) and how each
gain is parameterised (``param``). Output-Norm gains (QK-norm, post-branch norms) have only a
parameterisation. Layers never look at the preset name.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from scalevec.typed_config import ConfigError, update

Placement = Literal["none", "input", "dual", "dual_norm", "norm_output"]
Param = Literal["plain", "or", "er", "none"]
DecayPolicy = Literal["none", "input", "all", "output"]
GainRole = Literal["input", "output"]  # a gain's role by its slot name (``scale.roles``)

PLACEMENT_DOC = {
    "none": "no gain: W x̂",
    "input": "input gain: W (γ ⊙ x̂), the standard Pre-Norm placement",
    "dual": "DP: γ_a ⊙ W (γ_b ⊙ x̂)",
    "dual_norm": "DNP: γ_a ⊙ Norm(W (γ_b ⊙ x̂))",
    "norm_output": "γ_a ⊙ Norm(W x̂): what DNP folds to once γ_b is multiplied into W",
}


@dataclass
class SiteSpec:
    """Scale vectors of one site (a norm and the linear branches that read it)."""

    placement: Placement = "input"
    shared: bool = True  # one input γ shared by all branches; False = branch-specific (HG)
    param: Param = "plain"  # parameterisation of this site's gains

    @property
    def has_input(self) -> bool:
        return self.placement in ("input", "dual", "dual_norm") and self.param != "none"

    @property
    def has_output(self) -> bool:
        return self.placement in ("dual", "dual_norm", "norm_output") and self.param != "none"

    @property
    def has_norm(self) -> bool:
        return self.placement in ("dual_norm", "norm_output")


@dataclass
class ScaleConfig:
    """The scale-vector strategy. ``strategy`` names a preset; every other field may override it."""

    strategy: str = "baseline"
    attn: SiteSpec = field(default_factory=SiteSpec)  # q, k, v
    mlp: SiteSpec = field(default_factory=SiteSpec)  # gate, up (and MoE expert gate, up)
    router: SiteSpec = field(default_factory=SiteSpec)  # MoE router: shares the MLP norm; own γ only with HG
    final: SiteSpec = field(default_factory=SiteSpec)  # final norm -> LM head
    qk_norm: Param = "plain"  # Output-Norm gain of QK-norm (when the model has QK-norm)
    post_norm: Param = "plain"  # Output-Norm gain of post-branch norms (when the model has them)
    weight_decay: DecayPolicy = "none"  # which gains get weight decay: none, input (IWD), all, output
    # OR / ER details (docs/paper.md): γ = m · √d · α/‖α‖ with scalar m by default.
    magnitude: Literal["scalar", "vector"] = "scalar"
    sqrt_d: bool = True
    er_exp: Literal["magnitude", "elementwise"] = "magnitude"
    init: float = 1.0  # value of every gain at initialisation
    expert_gains: Literal["shared", "per_expert"] = "shared"  # MoE: HG gains shared across experts or not
    # Role of a gain by its slot name (e.g. "attn.v.out", "mlp.up.out", "qk_norm"); defaults in
    # layers.output_gain_role.
    roles: dict[str, GainRole] = field(default_factory=dict)

    def apply_table(self, table: dict[str, Any], prefix: str = "scale.") -> ScaleConfig:
        """Preset first, then the explicit keys on top (so ``strategy=unified mlp.param=er`` works)."""
        if "strategy" in table:
            name = table["strategy"]
            if not isinstance(name, str):
                raise ConfigError(f"{prefix}strategy: expected a preset name, got {name!r}")
            base = preset(name)
        else:
            base = copy.deepcopy(self)
        rest = {k: v for k, v in table.items() if k != "strategy"}
        update(base, rest, prefix=prefix)
        base.validate(prefix)
        return base

    def validate(self, prefix: str = "scale.") -> None:
        for name in ("attn", "mlp", "router", "final"):
            s: SiteSpec = getattr(self, name)
            if s.param == "none" and s.placement != "none":
                s.placement = "none"
        if self.final.placement not in ("none", "input", "dual"):
            raise ConfigError(
                f"{prefix}final.placement: {self.final.placement!r} is not allowed for the LM head "
                "(a norm over logits is not a scale-vector design); use 'none', 'input' or 'dual'"
            )
        if self.router.has_norm:
            raise ConfigError(f"{prefix}router.placement: {self.router.placement!r} puts a norm over router logits; "
                              "use 'none', 'input' or 'dual'")
        if self.init <= 0 and (self._uses("or") or self._uses("er")):
            raise ConfigError(f"{prefix}init: OR/ER need a positive initial gain, got {self.init}")
        for slot in self.roles:
            if not slot:
                raise ConfigError(f"{prefix}roles: empty slot name")

    def _uses(self, p: str) -> bool:
        return p in (self.attn.param, self.mlp.param, self.router.param, self.final.param, self.qk_norm,
                     self.post_norm)

    def describe(self) -> str:
        return PRESET_DOC.get(self.strategy, "custom strategy")


def _site(placement: Placement = "input", shared: bool = True, param: Param = "plain") -> SiteSpec:
    return SiteSpec(placement=placement, shared=shared, param=param)


def _build(name: str) -> ScaleConfig:
    scale = ScaleConfig(strategy=name)
    if name == "baseline":
        pass
    elif name == "no_scale":
        for site in (scale.attn, scale.mlp, scale.router, scale.final):
            site.placement, site.param = "none", "none"
        scale.qk_norm = scale.post_norm = "none"
    elif name == "iwd":
        scale.weight_decay = "input"
    elif name == "hg":
        scale.attn = _site(shared=False)
        scale.mlp = _site(shared=False)
        scale.router = _site(shared=False)
    elif name == "dp":
        scale.attn = _site("dual")
        scale.mlp = _site("dual")
    elif name == "dnp":
        scale.attn = _site("dual")
        scale.mlp = _site("dual_norm")
    elif name in ("or", "er"):
        for site in (scale.attn, scale.mlp, scale.router, scale.final):
            site.param = name
        scale.qk_norm = scale.post_norm = name
    elif name == "unified":
        scale.attn = _site("dual", shared=False, param="or")
        scale.mlp = _site("dual_norm", shared=False, param="or")
        scale.router = _site(shared=False, param="or")
        scale.final = _site(param="or")
        scale.qk_norm = scale.post_norm = "or"
        scale.weight_decay = "input"
    else:
        raise ConfigError(f"scale.strategy: unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return scale


PRESET_DOC: dict[str, str] = {
    "baseline": "one plain input γ per norm, shared by its branches; no weight decay on any γ (HF/Megatron)",
    "no_scale": "every scale vector removed (norms are parameter-free), including QK-norm and post-norm γ",
    "iwd": "baseline gains, weight decay on Input-Norm γ only (IWD)",
    "hg": "branch-specific input γ: separate for q, k, v and for gate, up (HG)",
    "dp": "dual placement γ_a ⊙ W(γ_b ⊙ x) on attention q/k/v and MLP gate/up (DP)",
    "dnp": "DP on q/k/v, dual placement with a norm between on MLP gate/up (DNP)",
    "or": "every γ as magnitude × unit direction, magnitude in the original space (OR)",
    "er": "every γ as magnitude × unit direction, magnitude in exponential space (ER)",
    "unified": "HG + DNP (DP on q/k/v, DNP on gate/up) + OR + IWD: the paper's unified strategy",
}
PRESETS = tuple(PRESET_DOC)


def preset(name: str) -> ScaleConfig:
    """A fresh copy of a named strategy preset."""
    scale = _build(name)
    scale.validate()
    return scale


def folded(scale: ScaleConfig) -> ScaleConfig:
    """The strategy of the folded model: every pure reparameterisation multiplied into the weights."""
    out = copy.deepcopy(scale)
    out.strategy = f"{scale.strategy}+folded"
    for name in ("attn", "mlp", "router", "final"):
        site: SiteSpec = getattr(out, name)
        # After folding, only a gain behind a norm survives (DNP's γ_a); it becomes a plain vector.
        site.placement = "norm_output" if site.has_norm and site.has_output else "none"
        site.shared = True
        site.param = "plain" if site.placement == "norm_output" else "none"
    out.qk_norm = "plain" if scale.qk_norm != "none" else "none"
    out.post_norm = "plain" if scale.post_norm != "none" else "none"
    return out


def as_dict(scale: ScaleConfig) -> dict[str, Any]:
    return dataclasses.asdict(scale)
