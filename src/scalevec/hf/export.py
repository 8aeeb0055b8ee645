"""Export: a run as a ``transformers`` directory, without importing ``transformers``.

Every norm site is written in Pre-Norm form ``W_b (γ ⊙ x̂)``: the site's shared input γ becomes the norm weight,
and every other pure reparameterisation (HG's per-branch γ, DP's γ_a, OR/ER's magnitude × direction) is
multiplied into W with the algebra of ``scalevec.fold`` (``Site.effective_weights``). Keeping the shared γ in the
norm instead of folding it as well keeps tied embeddings tied and makes import → export the identity.

Where every site has that form, the run exports as the class ``transformers`` ships for its style: ``llama`` as
``LlamaForCausalLM``, ``qwen3`` (per-head QK-norm before RoPE) as ``Qwen3ForCausalLM``, ``gemma`` (QK-norm and
post-branch norms) as ``Gemma3ForCausalLM`` with SiLU, full attention in every layer, query scaling 1/√head_dim,
its (1 + w) norms storing γ - 1 and its √d embedding scale divided out of the stored embedding. DNP's norm after
W has no place in any of them: such a run exports as ``ScalevecForCausalLM``, custom code of ours
(``remote/``) written into the folder, which keeps each DNP norm and its γ_a after the folded W.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save_file

from scalevec.hf.layout import CUSTOM, LAYOUTS, Layout, group_names, output_norms, plain, proj_norm_key, sites
from scalevec.hf.tokenizer import export_tokenizer
from scalevec.layers import Site
from scalevec.models import Decoder, ModelConfig
from scalevec.typed_config import ConfigError

if TYPE_CHECKING:
    from scalevec.data import Tokenizer

ARCHS = ("auto", "native", "custom")  # native: the class transformers ships; custom: ScalevecForCausalLM
REMOTE = Path(__file__).parent / "remote"
AUTO_MAP = {"AutoConfig": "configuration_scalevec.ScalevecConfig",
            "AutoModelForCausalLM": "modeling_scalevec.ScalevecForCausalLM"}


def _norm_kinds(model: Decoder) -> list[str]:
    """The site kinds (``attn``, ``mlp``) whose strategy puts a norm between W and γ_a (DNP)."""
    return [kind for kind in ("attn", "mlp") if getattr(model.scale, kind).has_norm]


def export_blockers(model: Decoder) -> list[str]:
    """Why ``model`` has no exact native HF counterpart, one reason per kind of site; empty when it has."""
    if model.cfg.moe.num_experts:
        return ["blocks.*.ffn (mixture of experts: no exporter yet)"]
    layout = LAYOUTS[model.cfg.style]
    out = []
    for kind in _norm_kinds(model):
        names = [n for n, site, _, _ in sites(model, layout) if site.name == kind]
        placement = getattr(model.scale, kind).placement
        out.append(f"{group_names(names)} (scale.{kind}.placement={placement}: the norm between W and γ_a has "
                   f"no place in {layout.architecture})")
    return out


def _refuse_moe(model: Decoder) -> None:
    if model.cfg.moe.num_experts:
        raise ConfigError(f"cannot export strategy {model.scale.strategy!r}: {export_blockers(model)[0]}")


def _refusal(model: Decoder, blockers: list[str]) -> str:
    """One line: why the native class cannot hold ``model``, and the two ways out."""
    plain_fix = " and ".join(f"scale.{kind}.placement=dual" for kind in _norm_kinds(model))
    return (f"cannot export strategy {model.scale.strategy!r} as {LAYOUTS[model.cfg.style].architecture}: "
            f"{'; '.join(blockers)}; --arch custom (what --arch auto picks) writes a custom-code model that "
            f"loads with trust_remote_code=True, or train with {plain_fix} for a plain one")


def _custom_notice(model: Decoder) -> str:
    """One line: why ``--arch auto`` writes the custom-code model."""
    names = [n for n, site, _, _ in sites(model, CUSTOM) if site.name in _norm_kinds(model)]
    return (f"{LAYOUTS[model.cfg.style].architecture} has no place for DNP's norm at {group_names(names)}: "
            f"writing the custom-code {CUSTOM.architecture} (--arch native refuses instead)")


@torch.no_grad()
def site_form(site: Site) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The site as ``W_b (γ ⊙ x̂)``, then ``γ_a ⊙ Norm(·)`` per branch if it has DNP: its shared input γ (ones if
    none), each branch's weight with every foldable gain multiplied in, and the γ_a a norm keeps (else none)."""
    folded = site.effective_weights(fold_output=not site.spec.has_norm)
    weights = {b.name: w.detach() for b, w in zip(site.defs, folded)}
    gain = site.gains.shared_input()
    gain = gain if gain is not None else next(iter(weights.values())).new_ones(site.d_in)
    kept = {}
    if site.spec.has_norm:
        gammas = site.gains.outputs()
        kept = {b.name: gammas[b.name].detach() if b.name in gammas else gain.new_ones(b.d_out)
                for b in site.defs}
    return gain.detach(), weights, kept


def prenorm_form(site: Site) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The site as ``W_b (γ ⊙ x̂)``: its shared input γ (ones if none) and each branch's folded weight."""
    if site.spec.has_norm:
        raise ValueError(f"site {site.name!r} normalises after W (DNP) and has no Pre-Norm form")
    gain, weights, _ = site_form(site)
    return gain, weights


def _exports_tied(model: Decoder, layout: Layout) -> bool:
    """The exported LM head can stay the embedding: tied, unscaled, and no head gain to fold into it."""
    head = model.head
    return model.cfg.tie_embeddings and not layout.embed_scale and not head.gains.per_branch_input \
        and not len(head.gains.out_gains)


@torch.no_grad()
def hf_state_dict(model: Decoder, layout: Layout | None = None) -> dict[str, torch.Tensor]:
    """The weights of ``model`` under the names of ``layout`` (default: its style's native class); raises
    ConfigError if that class cannot hold it exactly."""
    _refuse_moe(model)
    layout = layout or LAYOUTS[model.cfg.style]
    if layout is not CUSTOM and (blockers := export_blockers(model)):
        raise ConfigError(_refusal(model, blockers))
    sd = {key: w.detach() for w, key in plain(model)}
    if layout.embed_scale:
        sd["model.embed_tokens.weight"] = sd["model.embed_tokens.weight"] / math.sqrt(model.cfg.d_model)
    for _, site, norm_key, branch_keys in sites(model, layout):
        gain, weights, kept = site_form(site)
        sd[norm_key] = layout.stored(gain)
        sd.update({branch_keys[b]: w for b, w in weights.items()})
        sd.update({proj_norm_key(branch_keys[b]): g for b, g in kept.items()})
    if _exports_tied(model, layout):
        del sd["lm_head.weight"]
    for _, norm, key in output_norms(model, layout):
        gain = norm.gain().detach() if norm.gain is not None else model.embed.new_ones(norm.dim)
        sd[key] = layout.stored(gain)
    return sd


def _shapes(cfg: ModelConfig, tied: bool, dtype: torch.dtype, eot_id: int | None) -> dict:
    """The ``config.json`` fields every exported class shares."""
    return {
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "tie_word_embeddings": tied,
        "initializer_range": cfg.init_std,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "bos_token_id": eot_id,  # every training document starts with end-of-text
        "eos_token_id": eot_id,
    }


def hf_config(cfg: ModelConfig, tied: bool, dtype: torch.dtype, eot_id: int | None) -> dict:
    """``config.json`` for ``cfg``; transformers 4.x reads ``rope_theta``, 5.x ``rope_parameters``."""
    layout = LAYOUTS[cfg.style]
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    out = {
        "architectures": [layout.architecture],
        "model_type": layout.model_type,
        **_shapes(cfg, tied, dtype, eot_id),
        "rope_scaling": None,
        "rope_parameters": rope,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "use_cache": True,
        "pad_token_id": None,
    }
    if cfg.style == "llama":
        out.update(hidden_act="silu", mlp_bias=False)
    elif cfg.style == "qwen3":
        out.update(hidden_act="silu", use_sliding_window=False, sliding_window=None,
                   max_window_layers=cfg.n_layers, layer_types=["full_attention"] * cfg.n_layers)
    else:  # Gemma 3: SiLU, plain 1/√head_dim scaling, every layer global (the window spans the whole context)
        out.update(hidden_activation="silu", query_pre_attn_scalar=cfg.head_dim,
                   sliding_window=cfg.max_seq_len, layer_types=["full_attention"] * cfg.n_layers,
                   rope_local_base_freq=cfg.rope_theta,
                   rope_parameters={"full_attention": rope, "sliding_attention": rope},
                   final_logit_softcapping=None, attn_logit_softcapping=None)
    return out


def custom_config(model: Decoder, tied: bool, dtype: torch.dtype, eot_id: int | None) -> dict:
    """``config.json`` of the custom-code model: the shapes, and which norms the folded strategy keeps."""
    cfg = model.cfg
    return {
        "architectures": [CUSTOM.architecture],
        "model_type": CUSTOM.model_type,
        "auto_map": AUTO_MAP,
        "scalevec_strategy": model.scale.strategy,
        **_shapes(cfg, tied, dtype, eot_id),
        "attn_proj_norm": model.scale.attn.has_norm,
        "mlp_proj_norm": model.scale.mlp.has_norm,
        "qk_norm": cfg.qk_norm,
        "post_norm": cfg.post_norm,
    }


def export_hf(model: Decoder, out: str | Path, tokenizer: Tokenizer | None = None,
              dtype: torch.dtype = torch.float32, arch: str = "auto") -> list[str]:
    """Write ``model`` (and its tokenizer) as a transformers directory; returns what was written, as notes.

    ``arch``: ``native`` insists on the class transformers ships for the style, ``custom`` writes the
    custom-code model, ``auto`` picks native when it is exact and custom otherwise (with a note saying so).
    """
    if arch not in ARCHS:
        raise ConfigError(f"--arch: {arch!r} is not one of {', '.join(ARCHS)}")
    out, native = Path(out), LAYOUTS[model.cfg.style]
    _refuse_moe(model)
    if (out / "config.json").exists():
        raise ConfigError(f"--out: {out} already holds a model (config.json); choose another folder")
    blockers = export_blockers(model)
    if arch == "native" and blockers:
        raise ConfigError(_refusal(model, blockers))
    layout = CUSTOM if arch == "custom" or blockers else native
    notes = []
    if layout is CUSTOM and arch == "auto":
        notes.append(_custom_notice(model))
    sd = hf_state_dict(model, layout)
    tied = "lm_head.weight" not in sd
    eot = getattr(tokenizer, "eot_id", None)
    config = custom_config(model, tied, dtype, eot) if layout is CUSTOM else hf_config(model.cfg, tied, dtype, eot)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.to("cpu", dtype).contiguous() for k, v in sd.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    if layout is CUSTOM:
        for module in {f"{name.split('.')[0]}.py" for name in AUTO_MAP.values()}:
            shutil.copyfile(REMOTE / module, out / module)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    n = sum(v.numel() for v in sd.values())
    what = f"{n:,} parameters, {str(dtype).removeprefix('torch.')}" + (", tied embeddings" if tied else "")
    remote = ", trust_remote_code=True" if layout is CUSTOM else ""
    return [*notes, f"wrote {layout.architecture} ({what}) to {out}",
            export_tokenizer(tokenizer, out, model.cfg.max_seq_len),
            f"load it with: AutoModelForCausalLM.from_pretrained({str(out)!r}{remote})"]
