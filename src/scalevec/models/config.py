"""Model config and size presets.

Preset names count **non-embedding** parameters (attention, MLP and norm weights; not the token embedding
or the LM head), the convention of the paper's size ladders and of Chinchilla-style scaling fits.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Literal

from scalevec.typed_config import ConfigError, update


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

    def apply_table(self, table: dict[str, Any], prefix: str = "model.") -> "ModelConfig":
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


# name: (d_model, n_layers, n_heads, n_kv_heads, d_ff, default vocab); non-embedding count in the comment.
_SIZES: dict[str, tuple[int, int, int, int, int]] = {
    "tiny": (128, 4, 4, 0, 512),  # 1.05M
    "small": (256, 6, 4, 0, 1024),  # 6.3M
    "0.12b": (768, 12, 12, 0, 3328),  # 120M
    "0.5b": (1280, 24, 20, 0, 3712),  # 500M
    "1b": (2048, 16, 32, 8, 8192),  # 973M (Llama-3.2-1B shape)
    "2b": (2048, 32, 32, 8, 8192),  # 1.95B
}
MODEL_PRESETS = tuple(_SIZES)


def model_preset(name: str) -> ModelConfig:
    if name not in _SIZES:
        raise ConfigError(f"model.preset: unknown preset {name!r}; choose from {', '.join(MODEL_PRESETS)}")
    d, n_layers, n_heads, n_kv, d_ff = _SIZES[name]
    big = name not in ("tiny", "small")
    return ModelConfig(
        preset=name, d_model=d, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv, d_ff=d_ff,
        max_seq_len=4096 if big else 1024, rope_theta=500000.0 if big else 10000.0,
    )
