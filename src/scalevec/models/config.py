"""Model config and size presets.

Preset names count **non-embedding** parameters (attention, MLP and norm weights; not the token embedding
or the LM head), the convention of the paper's size ladders and of Chinchilla-style scaling fits.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Literal

from scalevec.typed_config import ConfigError, update


@dataclass
class MoEConfig:
    """Mixture-of-experts feed-forward (``num_experts = 0``: the dense MLP). Dropless token-choice top-k."""

    num_experts: int = 0  # routed experts E
    top_k: int = 2
    d_expert: int = 0  # hidden width of every expert (routed and shared); 0: model.d_ff
    num_shared: int = 0  # always-active shared experts (DeepSeek style), each of width d_expert
    first_dense: int = 0  # the first k layers keep the dense MLP of width model.d_ff
    score: Literal["softmax", "sigmoid"] = "softmax"
    renorm: bool = True  # renormalise the k selected weights to sum to 1 (top-1 softmax: leave off)
    route_scale: float = 1.0  # multiplies the routed experts' weights (DeepSeek's routed scaling factor)
    aux_coef: float = 0.01  # Switch/GShard load-balancing loss coefficient; 0 disables
    aux_scope: Literal["micro_batch", "sequence"] = "micro_batch"  # tokens over which load is balanced
    z_coef: float = 0.001  # router z-loss coefficient; 0 disables
    bias_rate: float = 0.0  # aux-loss-free expert bias step per optimizer step (DeepSeek-V3: 1e-3); 0 disables

    def validate(self, n_layers: int, prefix: str = "model.moe.") -> None:
        if self.num_experts < 0:
            raise ConfigError(f"{prefix}num_experts: must be >= 0, got {self.num_experts}")
        if self.num_experts == 0:
            return
        checks = [
            (1 <= self.top_k <= self.num_experts, "top_k", f"must be in [1, num_experts={self.num_experts}]"),
            (self.d_expert >= 0, "d_expert", "must be >= 0 (0: model.d_ff)"),
            (self.num_shared >= 0, "num_shared", "must be >= 0"),
            (0 <= self.first_dense <= n_layers, "first_dense", f"must be in [0, n_layers={n_layers}]"),
            (self.route_scale > 0, "route_scale", "must be positive"),
            (self.aux_coef >= 0, "aux_coef", "must be >= 0"),
            (self.z_coef >= 0, "z_coef", "must be >= 0"),
            (self.bias_rate >= 0, "bias_rate", "must be >= 0"),
        ]
        for ok, key, msg in checks:
            if not ok:
                raise ConfigError(f"{prefix}{key}: {msg}, got {getattr(self, key)}")


@dataclass
class ModelConfig:
    preset: str = "tiny"
    style: Literal["llama", "gemma", "qwen3"] = "llama"  # gemma: QK-norm + post-branch norms; qwen3: QK-norm
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 0  # 0: same as n_heads (no GQA)
    d_ff: int = 512
    vocab_size: int = 0  # 0: taken from the data's tokenizer
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    tie_embeddings: bool = False
    norm_eps: float = 1e-6
    init_std: float = 0.02
    moe: MoEConfig = field(default_factory=MoEConfig)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def qk_norm(self) -> bool:
        return self.style in ("gemma", "qwen3")

    @property
    def post_norm(self) -> bool:
        return self.style == "gemma"

    def apply_table(self, table: dict[str, Any], prefix: str = "model.") -> ModelConfig:
        base = model_preset(table["preset"]) if "preset" in table else copy.deepcopy(self)
        update(base, {k: v for k, v in table.items() if k != "preset"}, prefix=prefix)
        base.validate(prefix)
        return base

    def validate(self, prefix: str = "model.") -> None:
        for key in ("d_model", "n_layers", "n_heads", "d_ff", "max_seq_len"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"{prefix}{key}: must be positive, got {getattr(self, key)}")
        if self.d_model % self.n_heads:
            raise ConfigError(f"{prefix}n_heads: {self.n_heads} does not divide d_model={self.d_model}")
        if self.head_dim % 2:
            raise ConfigError(f"{prefix}n_heads: head_dim {self.head_dim} must be even for RoPE")
        if self.n_kv_heads < 0 or self.n_heads % self.kv_heads:
            raise ConfigError(f"{prefix}n_kv_heads: {self.n_kv_heads} must divide n_heads={self.n_heads}")
        if self.vocab_size < 0:
            raise ConfigError(f"{prefix}vocab_size: must be >= 0, got {self.vocab_size}")
        self.moe.validate(self.n_layers, f"{prefix}moe.")


# name: (d_model, n_layers, n_heads, n_kv_heads, d_ff, default vocab); non-embedding count in the comment.
_SIZES: dict[str, tuple[int, int, int, int, int]] = {
    "tiny": (128, 4, 4, 0, 512),  # 1.05M
    "small": (256, 6, 4, 0, 1024),  # 6.3M
    "0.12b": (768, 12, 12, 0, 3328),  # 120M
    "0.5b": (1280, 24, 20, 0, 3712),  # 500M
    "1b": (2048, 16, 32, 8, 8192),  # 973M (Llama-3.2-1B shape)
    "2b": (2048, 32, 32, 8, 8192),  # 1.95B
}
# MoE presets are named by *active* non-embedding parameters, so they sit on the dense ladder's compute axis
# (6·N_active·D): the dense preset's attention and depth, E experts top-k of width d_ff/k, so a token's expert
# MLP equals the dense one and the experts hold E/k = 4 times its MLP. Non-embedding counts, active / total
# (``scalevec info``): moe-tiny 1.05M / 3.4M, moe-small 6.3M / 20M, moe-0.12b 120M / 397M,
# moe-0.5b 0.50B / 1.53B, moe-1b 0.97B / 3.4B, moe-2b 1.95B / 6.8B.
# name: (dense base, num_experts, top_k, d_expert)
_MOE_SIZES: dict[str, tuple[str, int, int, int]] = {
    "moe-tiny": ("tiny", 8, 2, 256),
    "moe-small": ("small", 8, 2, 512),
    "moe-0.12b": ("0.12b", 16, 4, 832),
    "moe-0.5b": ("0.5b", 16, 4, 928),
    "moe-1b": ("1b", 16, 4, 2048),
    "moe-2b": ("2b", 16, 4, 2048),
}
MODEL_PRESETS = (*_SIZES, *_MOE_SIZES)


def model_preset(name: str) -> ModelConfig:
    if name == "custom":  # every field given explicitly (imported checkpoints); the defaults are tiny's shape
        return ModelConfig(preset="custom")
    if name in _MOE_SIZES:
        base, e, k, d_expert = _MOE_SIZES[name]
        cfg = model_preset(base)
        cfg.preset, cfg.moe = name, MoEConfig(num_experts=e, top_k=k, d_expert=d_expert)
        return cfg
    if name not in _SIZES:
        raise ConfigError(f"model.preset: unknown preset {name!r}; choose from {', '.join(MODEL_PRESETS)} "
                          "or custom (set every model.* field)")
    d, n_layers, n_heads, n_kv, d_ff = _SIZES[name]
    big = name not in ("tiny", "small")
    return ModelConfig(
        preset=name, d_model=d, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv, d_ff=d_ff,
        max_seq_len=4096 if big else 1024, rope_theta=500000.0 if big else 10000.0,
    )
