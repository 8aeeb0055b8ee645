"""Model configs, presets and builders."""

from __future__ import annotations

from scalevec.models.config import MODEL_PRESETS, ModelConfig, model_preset
from scalevec.models.decoder import Block, Decoder, KVCache
from scalevec.roles import remember_roles
from scalevec.strategy import ScaleConfig


def build_model(cfg: ModelConfig, scale: ScaleConfig) -> Decoder:
    """The decoder for a model config and a scale strategy (dense; MoE when the config asks for experts)."""
    return remember_roles(Decoder(cfg, scale, ffn_factory=_ffn_factory(cfg)))


def _ffn_factory(cfg: ModelConfig):
    if cfg.moe.num_experts == 0:
        return None
    from scalevec.models.moe import moe_factory

    return moe_factory(cfg)


__all__ = ["MODEL_PRESETS", "Block", "Decoder", "KVCache", "ModelConfig", "build_model", "model_preset"]
