"""Hugging Face interop: a run as a ``transformers`` checkpoint, and a Llama / Qwen3 checkpoint as a run.

Both directions read and write the files themselves (``config.json``, safetensors, ``tokenizer.json``), so
neither imports ``transformers``: the ``hf`` extra is only needed to *use* an exported directory.

**Export.** Every norm site is written in Pre-Norm form ``W_b (γ ⊙ x̂)``, the only form a Llama block has: the
site's shared input γ becomes HF's norm weight, and every other pure reparameterisation (HG's per-branch γ,
DP's γ_a, OR/ER's magnitude × direction) is multiplied into W with the algebra of ``scalevec.fold``
(``Site.effective_weights``). Keeping the shared γ in the norm instead of folding it as well keeps tied
embeddings tied and makes import → export the identity. Style ``llama`` exports as ``LlamaForCausalLM``,
``qwen3`` (per-head QK-norm before RoPE) as ``Qwen3ForCausalLM``, and ``gemma`` (QK-norm and post-branch
norms) as ``Gemma3ForCausalLM`` with SiLU, full attention in every layer, query scaling 1/√head_dim, its
(1 + w) norms storing γ - 1 and its √d embedding scale divided out of the stored embedding. What none of
them has (DNP's norm after W, MoE) is refused with the sites that prevent it.

**Import** reads a dense ``LlamaForCausalLM`` / ``Qwen3ForCausalLM`` directory and retrofits the chosen
strategy, preserving the function wherever the strategy is a pure reparameterisation of the checkpoint:

- a shared input γ (baseline, IWD, OR, ER) takes the checkpoint's γ (OR/ER split it into magnitude and unit
  direction); HG copies it into every branch; DP adds γ_a = 1; a site without an input gain (``no_scale`` or
  ``placement=none``) gets γ multiplied into W.
- DNP (``dual_norm`` / ``norm_output``) puts a norm between W and γ_a, which changes the function. Such an
  import is refused unless asked for (``allow_function_change``); it then starts from γ_b = γ, γ_a = 1,
  and the change is measured against the checkpoint on random tokens.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from scalevec.config import Config, from_table
from scalevec.layers import OutputNorm, Site
from scalevec.models import Decoder, ModelConfig, build_model
from scalevec.strategy import preset
from scalevec.typed_config import ConfigError, overrides_to_table

if TYPE_CHECKING:
    import tokenizers

    from scalevec.data import HFTokenizer, Tokenizer


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


# ---------------------------------------------------------------------------------------------- names


def _sites(model: Decoder, layout: Layout) -> Iterator[tuple[str, Site, str, dict[str, str]]]:
    """Every norm site: (scalevec name, site, HF name of its norm weight, {branch: HF name of its weight})."""
    for i, blk in enumerate(model.blocks):
        p = f"model.layers.{i}."
        yield (f"blocks.{i}.attn.qkv", blk.attn.qkv, p + "input_layernorm.weight",
               {b: f"{p}self_attn.{b}_proj.weight" for b in ("q", "k", "v")})
        yield (f"blocks.{i}.ffn.gate_up", blk.ffn.gate_up, f"{p}{layout.mlp_norm}.weight",
               {b: f"{p}mlp.{b}_proj.weight" for b in ("gate", "up")})
    yield "head", model.head, "model.norm.weight", {"head": "lm_head.weight"}


def _plain(model: Decoder) -> Iterator[tuple[torch.Tensor, str]]:
    """Weights stored as they are (but for Gemma's embedding scale): embedding, o_proj, down_proj."""
    yield model.embed, "model.embed_tokens.weight"
    for i, blk in enumerate(model.blocks):
        yield blk.attn.wo, f"model.layers.{i}.self_attn.o_proj.weight"
        yield blk.ffn.w_down, f"model.layers.{i}.mlp.down_proj.weight"


def _output_norms(model: Decoder, layout: Layout) -> Iterator[tuple[str, OutputNorm, str]]:
    """Norms with no linear map after them: QK-norm and post-branch norms, with their HF weight names."""
    for i, blk in enumerate(model.blocks):
        p = f"model.layers.{i}."
        if blk.attn.q_norm is not None:
            yield f"blocks.{i}.attn.q_norm", blk.attn.q_norm, p + "self_attn.q_norm.weight"
            yield f"blocks.{i}.attn.k_norm", blk.attn.k_norm, p + "self_attn.k_norm.weight"
        if blk.post_attn is not None:
            yield f"blocks.{i}.post_attn", blk.post_attn, f"{p}{layout.post_norms[0]}.weight"
            yield f"blocks.{i}.post_ffn", blk.post_ffn, f"{p}{layout.post_norms[1]}.weight"


def _group(names: list[str]) -> str:
    """``blocks.0.ffn.gate_up, blocks.1.ffn.gate_up`` -> ``blocks.*.ffn.gate_up``, order kept."""
    out: list[str] = []
    for n in names:
        g = ".".join("*" if p.isdigit() else p for p in n.split("."))
        if g not in out:
            out.append(g)
    return ", ".join(out)


# ---------------------------------------------------------------------------------------------- export


def export_blockers(model: Decoder) -> list[str]:
    """Why ``model`` has no exact HF counterpart, one reason per kind of site; empty when it exports."""
    cfg = model.cfg
    if cfg.moe.num_experts:
        return ["blocks.*.ffn (mixture of experts: no exporter yet)"]
    layout = LAYOUTS[cfg.style]
    out = []
    for kind in ("attn", "mlp"):
        names = [n for n, site, _, _ in _sites(model, layout) if site.name == kind and site.spec.has_norm]
        if names:
            placement = getattr(model.scale, kind).placement
            out.append(f"{_group(names)} (scale.{kind}.placement={placement}: the norm between W and γ_a has "
                       f"no place in {layout.architecture})")
    return out


@torch.no_grad()
def prenorm_form(site: Site) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The site as ``W_b (γ ⊙ x̂)``: its shared input γ (ones if none) and each branch's folded weight."""
    if site.spec.has_norm:
        raise ValueError(f"site {site.name!r} normalises after W (DNP) and has no Pre-Norm form")
    weights = {b.name: w.detach() for b, w in zip(site.defs, site.effective_weights(fold_output=True))}
    gain = site.in_scale() if site.in_scale is not None else next(iter(weights.values())).new_ones(site.d_in)
    return gain.detach(), weights


def _exports_tied(model: Decoder) -> bool:
    """The exported LM head can stay the embedding: tied, unscaled, and no head gain to fold into it."""
    head, layout = model.head, LAYOUTS[model.cfg.style]
    return model.cfg.tie_embeddings and not layout.embed_scale and not len(head.in_scales) \
        and not len(head.out_scales)


@torch.no_grad()
def hf_state_dict(model: Decoder) -> dict[str, torch.Tensor]:
    """The weights of ``model`` under HF names; raises ConfigError if it cannot be exported exactly."""
    blockers = export_blockers(model)
    if blockers:
        raise ConfigError(f"cannot export strategy {model.scale.strategy!r} exactly: " + "; ".join(blockers))
    layout = LAYOUTS[model.cfg.style]
    sd = {key: w.detach() for w, key in _plain(model)}
    if layout.embed_scale:
        sd["model.embed_tokens.weight"] = sd["model.embed_tokens.weight"] / math.sqrt(model.cfg.d_model)
    for _, site, norm_key, branch_keys in _sites(model, layout):
        gain, weights = prenorm_form(site)
        sd[norm_key] = layout.stored(gain)
        sd.update({branch_keys[b]: w for b, w in weights.items()})
    if _exports_tied(model):
        del sd["lm_head.weight"]
    for _, norm, key in _output_norms(model, layout):
        gain = norm.gain().detach() if norm.gain is not None else model.embed.new_ones(norm.dim)
        sd[key] = layout.stored(gain)
    return sd


def hf_config(cfg: ModelConfig, tied: bool, dtype: torch.dtype, eot_id: int | None) -> dict:
    """``config.json`` for ``cfg``; transformers 4.x reads ``rope_theta``, 5.x ``rope_parameters``."""
    layout = LAYOUTS[cfg.style]
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    out = {
        "architectures": [layout.architecture],
        "model_type": layout.model_type,
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
        "rope_scaling": None,
        "rope_parameters": rope,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": tied,
        "initializer_range": cfg.init_std,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "use_cache": True,
        "bos_token_id": eot_id,  # every training document starts with end-of-text
        "eos_token_id": eot_id,
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


def export_hf(model: Decoder, out: str | Path, tokenizer: Tokenizer | None = None,
              dtype: torch.dtype = torch.float32) -> list[str]:
    """Write ``model`` (and its tokenizer) as a transformers directory; returns what was written, as notes."""
    out = Path(out)
    if (out / "config.json").exists():
        raise ConfigError(f"--out: {out} already holds a model (config.json); choose another folder")
    sd = hf_state_dict(model)
    tied = "lm_head.weight" not in sd
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.to("cpu", dtype).contiguous() for k, v in sd.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    eot = getattr(tokenizer, "eot_id", None)
    (out / "config.json").write_text(json.dumps(hf_config(model.cfg, tied, dtype, eot), indent=2) + "\n")
    n = sum(v.numel() for v in sd.values())
    what = f"{n:,} parameters, {str(dtype).removeprefix('torch.')}" + (", tied embeddings" if tied else "")
    return [f"wrote {LAYOUTS[model.cfg.style].architecture} ({what}) to {out}",
            export_tokenizer(tokenizer, out, model.cfg.max_seq_len)]


# ---------------------------------------------------------------------------------------------- tokenizer


def hf_tokenizer(tokenizer: Tokenizer) -> tokenizers.Tokenizer | None:
    """The run's tokenizer as a ``tokenizers.Tokenizer`` with the same ids, or None if it cannot be one."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from scalevec.data import HFTokenizer
    from scalevec.data.tokenizer import EOT, _gpt2_byte_decoder, _gpt2_folder

    if isinstance(tokenizer, HFTokenizer):  # bpe, or a user's tokenizer.json: a copy of it as it is
        return Tokenizer.from_str(tokenizer.tokenizer.to_str())
    char_of = {b: c for c, b in _gpt2_byte_decoder().items()}
    if tokenizer.kind == "gpt2":  # the tiktoken encoding, rebuilt from the GPT-2 files it was built from
        folder = _gpt2_folder()
        vocab = json.loads((folder / "encoder.json").read_text(encoding="utf-8"))
        lines = (folder / "vocab.bpe").read_text(encoding="utf-8").split("\n")[1:-1]  # after "#version"
        merges = [tuple(m.split()) for m in lines]
        tok = Tokenizer(models.BPE(vocab, merges))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    elif tokenizer.kind == "byte":  # byte b -> its GPT-2 printable stand-in, with id b; no merges, no split
        tok = Tokenizer(models.BPE({char_of[b]: b for b in range(256)}, []))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    else:
        return None
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([EOT])
    return tok


def export_tokenizer(tokenizer: Tokenizer | None, out: Path, max_len: int) -> str:
    """``tokenizer.json`` + ``tokenizer_config.json`` for ``PreTrainedTokenizerFast``; returns a note."""
    from tokenizers import processors

    tok = hf_tokenizer(tokenizer) if tokenizer is not None else None
    if tok is None:
        return "no tokenizer written: the run has none"
    eot = tok.id_to_token(tokenizer.eot_id)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eot, "model_max_length": max_len,
              "clean_up_tokenization_spaces": False}
    if tok.post_processor is None:  # an encoded text starts with end-of-text, as every training document did
        tok.post_processor = processors.TemplateProcessing(
            single=f"{eot} $A", pair=f"{eot} $A {eot} $B", special_tokens=[(eot, tokenizer.eot_id)])
        config["bos_token"] = eot
    (out / "tokenizer.json").write_text(tok.to_str(pretty=True))
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return f"wrote the run's {tokenizer.kind} tokenizer ({tokenizer.vocab_size} ids, end-of-text {eot!r})"


# ---------------------------------------------------------------------------------------------- import


def read_hf_config(hf_dir: Path) -> dict:
    path = hf_dir / "config.json"
    if not path.is_file():
        raise ConfigError(f"{hf_dir} is not a Hugging Face model directory (no config.json)")
    return json.loads(path.read_text())


def _rope_theta(c: dict) -> float:
    """The RoPE base; any variant but plain RoPE (v4 ``rope_scaling``, v5 ``rope_parameters``) is refused."""
    params, scaling = c.get("rope_parameters") or {}, c.get("rope_scaling") or {}
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if kind != "default" or "factor" in params or "factor" in scaling:
        raise ConfigError(f"config.json: RoPE scaling {kind!r} is not supported (scalevec uses plain RoPE)")
    if float(params.get("partial_rotary_factor", c.get("partial_rotary_factor", 1.0))) != 1.0:
        raise ConfigError("config.json: partial rotary embeddings are not supported")
    return float(params.get("rope_theta", c.get("rope_theta", 10000.0)))


def model_config_from_hf(c: dict) -> ModelConfig:
    """The scalevec ``ModelConfig`` of an HF Llama / Qwen3 ``config.json``; anything else is refused."""
    style = IMPORTABLE.get(c.get("model_type", ""))
    if style is None:
        names = ", ".join(LAYOUTS[s].architecture for s in IMPORTABLE.values())
        raise ConfigError(f"config.json: model_type {c.get('model_type')!r} is not supported; "
                          f"import reads {names}")
    act = c.get("hidden_act", "silu")
    unsupported = [
        (c.get("attention_bias", False), "attention_bias=true (scalevec's projections have no bias)"),
        (c.get("mlp_bias", False), "mlp_bias=true (scalevec's projections have no bias)"),
        (act != "silu", f"hidden_act={act!r} (scalevec's MLP is SwiGLU)"),
        (c.get("use_sliding_window", False), "use_sliding_window=true (scalevec attends to all positions)"),
    ]
    for bad, what in unsupported:
        if bad:
            raise ConfigError(f"config.json: {what} is not supported")
    d, heads = c["hidden_size"], c["num_attention_heads"]
    if d % heads or c.get("head_dim") not in (None, d // heads):
        raise ConfigError(f"config.json: head_dim={c.get('head_dim')} is not hidden_size / "
                          f"num_attention_heads = {d / heads:g}, which scalevec requires")
    kv = c.get("num_key_value_heads") or heads
    mc = ModelConfig(
        preset="custom", style=style, d_model=d, n_layers=c["num_hidden_layers"], n_heads=heads,
        n_kv_heads=0 if kv == heads else kv, d_ff=c["intermediate_size"], vocab_size=c["vocab_size"],
        max_seq_len=c.get("max_position_embeddings", 2048), rope_theta=_rope_theta(c),
        tie_embeddings=bool(c.get("tie_word_embeddings", False)),
        norm_eps=float(c.get("rms_norm_eps", 1e-6)), init_std=float(c.get("initializer_range", 0.02)),
    )
    mc.validate("config.json: ")
    return mc


def read_hf_weights(hf_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint: one or sharded safetensors, else ``pytorch_model.bin`` (weights only)."""
    shards = (("model.safetensors.index.json", load_file), ("pytorch_model.bin.index.json", _load_bin))
    for index, reader in shards:
        if (hf_dir / index).is_file():
            files = sorted(set(json.loads((hf_dir / index).read_text())["weight_map"].values()))
            return {k: v for f in files for k, v in reader(hf_dir / f).items()}
    if (hf_dir / "model.safetensors").is_file():
        return load_file(hf_dir / "model.safetensors")
    if (hf_dir / "pytorch_model.bin").is_file():
        return _load_bin(hf_dir / "pytorch_model.bin")
    raise ConfigError(f"{hf_dir}: no model.safetensors or pytorch_model.bin")


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


@torch.no_grad()
def load_prenorm(site: Site, gain: torch.Tensor, weights: dict[str, torch.Tensor]) -> bool:
    """Set ``site`` to compute ``W_b (γ ⊙ x̂)``; False if its strategy puts a norm in the way (DNP).

    With a norm in the way the site becomes ``1 ⊙ Norm(W_b (γ ⊙ x̂))``: the closest start, not the function.
    """
    if site.in_scale is not None:
        site.in_scale.set_value(gain)
    for b, w in weights.items():
        if b in site.in_scales:
            site.in_scales[b].set_value(gain)  # HG: every branch starts from the shared γ
        elif site.in_scale is None:
            w = w * gain  # no input gain in this strategy: γ folds into W
        if b in site.out_scales:
            site.out_scales[b].set_value(w.new_ones(w.shape[0]))  # DP / DNP: γ_a = 1
        if site.weights[b].shape != w.shape:
            raise ConfigError(f"{site.name}.{b}: checkpoint shape {tuple(w.shape)}, expected "
                              f"{tuple(site.weights[b].shape)}")
        site.weights[b].copy_(w)
    return not site.spec.has_norm


DROPPED_GAIN = "scale.qk_norm=none drops a gain the checkpoint uses"


@torch.no_grad()
def load_hf_state_dict(model: Decoder, sd: dict[str, torch.Tensor]) -> dict[str, str]:
    """Copy HF Llama / Qwen3 weights into ``model``, retrofitting its strategy; returns {site: why} for the
    sites whose function the strategy changes (empty: the model computes exactly what the checkpoint does)."""
    layout = LAYOUTS[model.cfg.style]
    sd = {k: v.float() for k, v in sd.items() if not k.endswith("rotary_emb.inv_freq")}
    if "lm_head.weight" not in sd:  # tied in the checkpoint (HF omits the alias)
        sd["lm_head.weight"] = sd.get("model.embed_tokens.weight")
    expected = {key for _, key in _plain(model)} | {key for *_, key in _output_norms(model, layout)}
    for _, _, norm_key, branch_keys in _sites(model, layout):
        expected |= {norm_key, *branch_keys.values()}
    if expected != set(sd):
        missing, extra = sorted(expected - set(sd)), sorted(set(sd) - expected)
        raise ConfigError(f"checkpoint does not match its config.json: missing {missing[:3]}, "
                          f"unexpected {extra[:3]}")
    for w, key in _plain(model):
        if w.shape != sd[key].shape:
            raise ConfigError(f"{key}: checkpoint shape {tuple(sd[key].shape)}, expected {tuple(w.shape)}")
        w.copy_(sd[key])
    changed = {}
    for name, site, norm_key, branch_keys in _sites(model, layout):
        try:
            if not load_prenorm(site, layout.gain(sd[norm_key]), {b: sd[k] for b, k in branch_keys.items()}):
                key = f"scale.{site.name}.placement"
                changed[name] = (f"{key}={site.spec.placement} puts a norm between W and γ_a; "
                                 f"{key}=dual keeps the site pure")
        except ValueError as e:  # a parameterisation that cannot hold γ (e.g. elementwise ER and γ <= 0)
            raise ConfigError(f"{name}: the strategy cannot hold the checkpoint's γ ({e})") from None
    for name, norm, key in _output_norms(model, layout):
        gain = layout.gain(sd[key])
        if norm.gain is not None:
            norm.gain.set_value(gain)
        elif not torch.all(gain == 1):
            changed[name] = DROPPED_GAIN
    return changed


@dataclass
class Imported:
    """An imported model: its run config, the model, what changed, and the difference measured."""

    cfg: Config
    model: Decoder
    architecture: str
    changed: dict[str, str] = field(default_factory=dict)  # {site: why} where the function changes
    notes: list[str] = field(default_factory=list)
    check: dict[str, float] = field(default_factory=dict)  # vs the checkpoint, on random tokens


def import_hf(hf_dir: str | Path, strategy: str = "baseline", overrides: list[str] | None = None,
              allow_function_change: bool = False, probe_len: int = 64, seed: int = 0) -> Imported:
    """A local HF Llama / Qwen3 directory as a scalevec model with ``strategy`` retrofitted.

    ``overrides`` are run-config ``key=value`` pairs (``scale.*``, ``data.*``, ``optim.*``, ``train.*``); the
    architecture comes from ``config.json``. The result is compared with the checkpoint on random tokens.
    """
    hf_dir = Path(hf_dir)
    c = read_hf_config(hf_dir)
    mc = model_config_from_hf(c)
    table = overrides_to_table([f"scale.strategy={strategy}", *(overrides or [])])
    if "model" in table:
        raise ConfigError("model.*: the architecture comes from config.json; it cannot be overridden")
    cfg = from_table(table)
    cfg.model = mc
    notes = []
    if mc.tie_embeddings and not cfg.scale.final.has_input:  # the final norm's γ must fold into the head
        mc.tie_embeddings = False
        notes.append("untied the LM head from the embedding: the strategy has no final-norm γ to hold")
    cfg.validate()
    sd = read_hf_weights(hf_dir)
    tokens = torch.randint(0, mc.vocab_size, (2, min(probe_len, mc.max_seq_len)),
                           generator=torch.Generator().manual_seed(seed))
    reference = build_model(mc, preset("baseline"))  # exactly HF's Pre-Norm block: the checkpoint's function
    load_hf_state_dict(reference, sd)
    with torch.no_grad():
        ref_logits = reference.eval()(tokens)
    del reference
    model = build_model(mc, cfg.scale)
    changed = load_hf_state_dict(model, sd)
    del sd
    if changed and not allow_function_change:
        raise ConfigError(f"strategy {cfg.scale.strategy!r} is not a pure reparameterisation of this "
                          f"checkpoint: {describe_changes(changed)}; pass --allow-function-change to apply "
                          "it anyway")
    with torch.no_grad():
        check = compare_logits(ref_logits, model.eval()(tokens), tokens)
    architecture = (c.get("architectures") or [LAYOUTS[mc.style].architecture])[0]
    return Imported(cfg, model, architecture, changed, notes, check)


def describe_changes(changed: dict[str, str]) -> str:
    """``{site: why}`` as one line, sites grouped across layers: ``blocks.*.ffn.gate_up (why)``."""
    reasons = dict.fromkeys(changed.values())
    return "; ".join(f"{_group([n for n, r in changed.items() if r == why])} ({why})" for why in reasons)


def compare_logits(ref: torch.Tensor, new: torch.Tensor, tokens: torch.Tensor) -> dict[str, float]:
    """How far ``new`` is from ``ref`` on ``tokens``: logit differences, KL(ref ‖ new), next-token losses."""
    lp, lq = F.log_softmax(ref.float(), -1), F.log_softmax(new.float(), -1)
    diff = (ref - new).abs()

    def loss(logp: torch.Tensor) -> float:
        return F.nll_loss(logp[:, :-1].flatten(0, 1), tokens[:, 1:].flatten()).item()

    return {"max_abs_logit_diff": diff.max().item(), "mean_abs_logit_diff": diff.mean().item(),
            "kl_per_token": max((lp.exp() * (lp - lq)).sum(-1).mean().item(), 0.0),
            "loss_checkpoint": loss(lp), "loss_imported": loss(lq), "tokens": tokens.numel()}


def hf_dir_tokenizer(hf_dir: Path) -> tuple[HFTokenizer | None, str | None]:
    """The checkpoint's ``tokenizer.json`` as a scalevec tokenizer and None, or None and why not."""
    from scalevec.data import DataError, HFTokenizer

    path = hf_dir / "tokenizer.json"
    if not path.is_file():
        return None, f"{hf_dir} has no tokenizer.json"
    try:
        return HFTokenizer.from_file(path), None
    except DataError as e:
        return None, str(e)


def import_run(hf_dir: str | Path, out: str | Path, strategy: str = "baseline",
               overrides: list[str] | None = None, allow_function_change: bool = False) -> Imported:
    """``import_hf`` written as a run at step 0, with the checkpoint's tokenizer, that training can resume."""
    from scalevec.train.run import TOKENIZER_DIR, write_run

    hf_dir, out, overrides = Path(hf_dir), Path(out), list(overrides or [])
    if (out / "config.toml").exists():  # fail before the (possibly long) load
        raise ConfigError(f"--out: {out} already holds a run; choose another folder")
    imp = import_hf(hf_dir, strategy, [*overrides, f"run.out={out}"], allow_function_change)
    tok, why = hf_dir_tokenizer(hf_dir)
    if any(o.split("=", 1)[0].strip() == "data.tokenizer" for o in overrides):
        pass  # the user chose the data's tokenizer
    elif tok is not None:
        imp.cfg.data.tokenizer = str((out / TOKENIZER_DIR).resolve())  # tokenize data as the model was
        imp.notes.append(f"data.tokenizer set to the checkpoint's tokenizer ({tok.vocab_size} ids)")
    else:
        imp.notes.append(f"warning: {why}; set data.tokenizer to the model's tokenizer before training")
    write_run(out, imp.cfg, imp.model)
    if tok is not None:
        tok.save(out / TOKENIZER_DIR)
    return imp
