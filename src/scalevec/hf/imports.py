"""Import: a dense ``LlamaForCausalLM`` / ``Qwen3ForCausalLM`` directory (or scalevec's own custom-code
``ScalevecForCausalLM`` export) as a run, with a strategy retrofitted.

The import preserves the function wherever the strategy is a pure reparameterisation of the checkpoint:

- a shared input γ (baseline, IWD, OR, ER) takes the checkpoint's γ (OR/ER split it into magnitude and unit
  direction); HG copies it into every branch; DP adds γ_a = 1; a site without an input gain (``no_scale`` or
  ``placement=none``) gets γ multiplied into W.
- DNP (``dual_norm`` / ``norm_output``) puts a norm between W and γ_a, which changes the function. Such an
  import is refused unless asked for (``allow_function_change``); it then starts from γ_b = γ, γ_a = 1,
  and the change is measured against the checkpoint on random tokens.
- a custom-code export's DNP norms import exactly into a strategy that has them there (γ_a the checkpoint's);
  a strategy without them drops them, which is refused in the same way.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from scalevec.config import Config, from_table
from scalevec.hf.layout import (
    CUSTOM,
    IMPORTABLE,
    LAYOUTS,
    Layout,
    group_names,
    output_norms,
    plain,
    proj_norm_key,
    sites,
)
from scalevec.hf.tokenizer import hf_dir_tokenizer
from scalevec.layers import Site
from scalevec.models import Decoder, ModelConfig, build_model
from scalevec.strategy import preset
from scalevec.typed_config import ConfigError, overrides_to_table


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


CUSTOM_STYLES = {(False, False): "llama", (True, False): "qwen3", (True, True): "gemma"}  # (qk_norm, post_norm)


def _style(c: dict) -> str | None:
    if c.get("model_type") == CUSTOM.model_type:
        return CUSTOM_STYLES.get((bool(c.get("qk_norm")), bool(c.get("post_norm"))))
    return IMPORTABLE.get(c.get("model_type", ""))


def layout_of(c: dict) -> Layout:
    """How the checkpoint of ``config.json`` names its weights."""
    return CUSTOM if c.get("model_type") == CUSTOM.model_type else LAYOUTS[_style(c)]


def checkpoint_norms(c: dict) -> frozenset[str]:
    """The site kinds (``attn``, ``mlp``) whose projections the checkpoint normalises: DNP, which only
    scalevec's custom-code export has."""
    return frozenset(kind for kind in ("attn", "mlp") if c.get(f"{kind}_proj_norm"))


def model_config_from_hf(c: dict) -> ModelConfig:
    """The scalevec ``ModelConfig`` of an HF Llama / Qwen3 (or scalevec custom-code) ``config.json``; anything
    else is refused."""
    style = _style(c)
    if style is None and c.get("model_type") == CUSTOM.model_type:
        raise ConfigError("config.json: post_norm=true with qk_norm=false matches no scalevec model style")
    if style is None:
        names = ", ".join(LAYOUTS[s].architecture for s in IMPORTABLE.values())
        raise ConfigError(f"config.json: model_type {c.get('model_type')!r} is not supported; "
                          f"import reads {names} and scalevec's {CUSTOM.architecture}")
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
def load_prenorm(site: Site, gain: torch.Tensor, weights: dict[str, torch.Tensor],
                 kept: dict[str, torch.Tensor] | None = None) -> bool:
    """Set ``site`` to compute ``W_b (γ ⊙ x̂)``, or ``γ_a ⊙ Norm(W_b (γ ⊙ x̂))`` given each branch's ``kept``
    γ_a; False if its strategy has a norm where the checkpoint has none, or none where it has one.

    With a norm in the way the site becomes ``1 ⊙ Norm(W_b (γ ⊙ x̂))``: the closest start, not the function.
    """
    gains = site.gains
    if gains.in_gain is not None and not gains.per_branch_input:
        gains.in_gain.set_value(gain)
    for b, w in weights.items():
        if gains.per_branch_input:
            gains.in_gain.set_value(gain, row=gains.branches.index(b))  # HG: every branch starts from the shared γ
        elif gains.in_gain is None:
            w = w * gain  # no input gain in this strategy: γ folds into W
        if b in gains.out_gains:  # DP / DNP: the checkpoint's γ_a, else 1
            gains.out_gains[b].set_value(kept[b] if kept is not None else w.new_ones(w.shape[0]))
        if site.weights[b].shape != w.shape:
            raise ConfigError(f"{site.name}.{b}: checkpoint shape {tuple(w.shape)}, expected "
                              f"{tuple(site.weights[b].shape)}")
        site.weights[b].copy_(w)
    return site.spec.has_norm == (kept is not None)


DROPPED_GAIN = "scale.qk_norm=none drops a gain the checkpoint uses"


@torch.no_grad()
def load_hf_state_dict(model: Decoder, sd: dict[str, torch.Tensor], layout: Layout | None = None,
                       norms: frozenset[str] = frozenset()) -> dict[str, str]:
    """Copy HF weights named as ``layout`` says (default: the native class of the model's style) into
    ``model``, retrofitting its strategy; ``norms``: the site kinds the checkpoint normalises after W (DNP).
    Returns {site: why} for the sites whose function the strategy changes (empty: the model computes exactly
    what the checkpoint does)."""
    layout = layout or LAYOUTS[model.cfg.style]
    sd = {k: v.float() for k, v in sd.items() if not k.endswith("rotary_emb.inv_freq")}
    if "lm_head.weight" not in sd:  # tied in the checkpoint (HF omits the alias)
        sd["lm_head.weight"] = sd.get("model.embed_tokens.weight")
    expected = {key for _, key in plain(model)} | {key for *_, key in output_norms(model, layout)}
    for _, site, norm_key, branch_keys in sites(model, layout):
        expected |= {norm_key, *branch_keys.values()}
        if site.name in norms:
            expected |= {proj_norm_key(k) for k in branch_keys.values()}
    if expected != set(sd):
        missing, extra = sorted(expected - set(sd)), sorted(set(sd) - expected)
        raise ConfigError(f"checkpoint does not match its config.json: missing {missing[:3]}, "
                          f"unexpected {extra[:3]}")
    for w, key in plain(model):
        if w.shape != sd[key].shape:
            raise ConfigError(f"{key}: checkpoint shape {tuple(sd[key].shape)}, expected {tuple(w.shape)}")
        w.copy_(sd[key])
    changed = {}
    for name, site, norm_key, branch_keys in sites(model, layout):
        kept = {b: sd[proj_norm_key(k)] for b, k in branch_keys.items()} if site.name in norms else None
        try:
            if not load_prenorm(site, layout.gain(sd[norm_key]), {b: sd[k] for b, k in branch_keys.items()}, kept):
                key = f"scale.{site.name}.placement"
                changed[name] = (f"{key}={site.spec.placement} puts a norm between W and γ_a; "
                                 f"{key}=dual keeps the site pure") if kept is None else \
                    (f"{key}={site.spec.placement} drops the checkpoint's norm between W and γ_a; "
                     f"{key}=dual_norm keeps it")
        except ValueError as e:  # a parameterisation that cannot hold γ (e.g. elementwise ER and γ <= 0)
            raise ConfigError(f"{name}: the strategy cannot hold the checkpoint's γ ({e})") from None
    for name, norm, key in output_norms(model, layout):
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
    layout, norms = layout_of(c), checkpoint_norms(c)
    plain_form = preset("baseline")  # exactly the checkpoint's block: Pre-Norm, and DNP's norm where it has one
    for kind in norms:
        getattr(plain_form, kind).placement = "norm_output"
    reference = build_model(mc, plain_form)
    load_hf_state_dict(reference, sd, layout, norms)
    with torch.no_grad():
        ref_logits = reference.eval()(tokens)
    del reference
    model = build_model(mc, cfg.scale)
    changed = load_hf_state_dict(model, sd, layout, norms)
    del sd
    if changed and not allow_function_change:
        raise ConfigError(f"strategy {cfg.scale.strategy!r} is not a pure reparameterisation of this "
                          f"checkpoint: {describe_changes(changed)}; pass --allow-function-change to apply "
                          "it anyway")
    with torch.no_grad():
        check = compare_logits(ref_logits, model.eval()(tokens), tokens)
    architecture = (c.get("architectures") or [layout.architecture])[0]
    return Imported(cfg, model, architecture, changed, notes, check)


def describe_changes(changed: dict[str, str]) -> str:
    """``{site: why}`` as one line, sites grouped across layers: ``blocks.*.ffn.gate_up (why)``."""
    reasons = dict.fromkeys(changed.values())
    return "; ".join(f"{group_names([n for n, r in changed.items() if r == why])} ({why})" for why in reasons)


def compare_logits(ref: torch.Tensor, new: torch.Tensor, tokens: torch.Tensor) -> dict[str, float]:
    """How far ``new`` is from ``ref`` on ``tokens``: logit differences, KL(ref ‖ new), next-token losses."""
    lp, lq = F.log_softmax(ref.float(), -1), F.log_softmax(new.float(), -1)
    diff = (ref - new).abs()

    def loss(logp: torch.Tensor) -> float:
        return F.nll_loss(logp[:, :-1].flatten(0, 1), tokens[:, 1:].flatten()).item()

    return {"max_abs_logit_diff": diff.max().item(), "mean_abs_logit_diff": diff.mean().item(),
            "kl_per_token": max((lp.exp() * (lp - lq)).sum(-1).mean().item(), 0.0),
            "loss_checkpoint": loss(lp), "loss_imported": loss(lq), "tokens": tokens.numel()}



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
