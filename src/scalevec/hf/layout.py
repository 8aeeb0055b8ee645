"""How each Hugging Face architecture names and stores what a scalevec model has: the key of every weight."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from scalevec.layers import OutputNorm, Site
from scalevec.models import Decoder


@dataclass(frozen=True)
class Layout:
    """How an HF architecture names and stores what a scalevec model style has."""

    architecture: str
    model_type: str
    mlp_norm: str = "post_attention_layernorm"  # the norm read by gate/up
    post_norms: tuple[str, str] | None = None  # norms after the attention and MLP branches (Gemma)
    gain_offset: float = 0.0  # HF's norm computes (offset + w) ⊙ x̂, so it stores γ - offset
    embed_scale: bool = False  # HF multiplies the embedding by √d_model

    def stored(self, gain: torch.Tensor) -> torch.Tensor:
        return gain - self.gain_offset if self.gain_offset else gain

    def gain(self, stored: torch.Tensor) -> torch.Tensor:
        return stored + self.gain_offset if self.gain_offset else stored


LAYOUTS = {  # scalevec style -> HF layout
    "llama": Layout("LlamaForCausalLM", "llama"),
    "qwen3": Layout("Qwen3ForCausalLM", "qwen3"),
    "gemma": Layout("Gemma3ForCausalLM", "gemma3_text", mlp_norm="pre_feedforward_layernorm",
                    post_norms=("post_attention_layernorm", "post_feedforward_layernorm"), gain_offset=1.0,
                    embed_scale=True),
}
IMPORTABLE = {"llama": "llama", "qwen3": "qwen3"}  # HF model_type -> scalevec style
# The custom-code model (``remote/modeling_scalevec.py``) names its norms as Gemma 3 does, for every style.
CUSTOM = Layout("ScalevecForCausalLM", "scalevec", mlp_norm="pre_feedforward_layernorm",
                post_norms=("post_attention_layernorm", "post_feedforward_layernorm"))


def sites(model: Decoder, layout: Layout) -> Iterator[tuple[str, Site, str, dict[str, str]]]:
    """Every norm site: (scalevec name, site, HF name of its norm weight, {branch: HF name of its weight})."""
    for i, blk in enumerate(model.blocks):
        p = f"model.layers.{i}."
        yield (f"blocks.{i}.attn.qkv", blk.attn.qkv, p + "input_layernorm.weight",
               {b: f"{p}self_attn.{b}_proj.weight" for b in ("q", "k", "v")})
        yield (f"blocks.{i}.ffn.gate_up", blk.ffn.gate_up, f"{p}{layout.mlp_norm}.weight",
               {b: f"{p}mlp.{b}_proj.weight" for b in ("gate", "up")})
    yield "head", model.head, "model.norm.weight", {"head": "lm_head.weight"}


def plain(model: Decoder) -> Iterator[tuple[torch.Tensor, str]]:
    """Weights stored as they are (but for Gemma's embedding scale): embedding, o_proj, down_proj."""
    yield model.embed, "model.embed_tokens.weight"
    for i, blk in enumerate(model.blocks):
        yield blk.attn.wo, f"model.layers.{i}.self_attn.o_proj.weight"
        yield blk.ffn.w_down, f"model.layers.{i}.mlp.down_proj.weight"


def output_norms(model: Decoder, layout: Layout) -> Iterator[tuple[str, OutputNorm, str]]:
    """Norms with no linear map after them: QK-norm and post-branch norms, with their HF weight names."""
    for i, blk in enumerate(model.blocks):
        p = f"model.layers.{i}."
        if blk.attn.q_norm is not None:
            yield f"blocks.{i}.attn.q_norm", blk.attn.q_norm, p + "self_attn.q_norm.weight"
            yield f"blocks.{i}.attn.k_norm", blk.attn.k_norm, p + "self_attn.k_norm.weight"
        if blk.post_attn is not None:
            yield f"blocks.{i}.post_attn", blk.post_attn, f"{p}{layout.post_norms[0]}.weight"
            yield f"blocks.{i}.post_ffn", blk.post_ffn, f"{p}{layout.post_norms[1]}.weight"


def group_names(names: list[str]) -> str:
    """``blocks.0.ffn.gate_up, blocks.1.ffn.gate_up`` -> ``blocks.*.ffn.gate_up``, order kept."""
    out: list[str] = []
    for n in names:
        g = ".".join("*" if p.isdigit() else p for p in n.split("."))
        if g not in out:
            out.append(g)
    return ", ".join(out)



def proj_norm_key(weight_key: str) -> str:
    """Where the custom-code model keeps a DNP branch's γ_a: ``...q_proj.weight`` -> ``...q_proj_norm.weight``."""
    return weight_key.removesuffix(".weight") + "_norm.weight"
