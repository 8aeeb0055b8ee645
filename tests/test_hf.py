"""Hugging Face interop and sampling: import / export checked against ``transformers`` itself, tiny models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from scalevec.config import load_config
from scalevec.fold import fold
from scalevec.hf import export_hf, import_hf, model_config_from_hf
from scalevec.models import KVCache, build_model, model_preset
from scalevec.sample import generate
from scalevec.scale import ScaleVector
from scalevec.typed_config import ConfigError

transformers = pytest.importorskip("transformers")

VOCAB = 97


def hf_model(arch: str = "llama", tie: bool = True, kv_heads: int = 2):
    """A random tiny HF model with norm weights away from 1 (so a lost γ would show)."""
    kw = {"vocab_size": VOCAB, "hidden_size": 48, "intermediate_size": 80, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": kv_heads, "max_position_embeddings": 64,
          "rope_theta": 5000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": tie}
    torch.manual_seed(0)
    if arch == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw))
    else:
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(head_dim=12, **kw))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.3)
    return model.eval()


def save_hf(tmp_path: Path, *args, **kw) -> tuple[Path, torch.nn.Module]:
    model = hf_model(*args, **kw)
    model.save_pretrained(tmp_path / "hf")
    return tmp_path / "hf", model


def hf_logits(model, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).logits


def tokens(n: int = 24, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, n), generator=torch.Generator().manual_seed(seed))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# ---------------------------------------------------------------------------------------------- import


@pytest.mark.parametrize(("arch", "tie", "kv_heads"),
                         [("llama", True, 2), ("llama", False, 4), ("qwen3", False, 2)])
def test_import_equals_hf_logits(tmp_path, arch, tie, kv_heads):
    hf_dir, ref = save_hf(tmp_path, arch, tie, kv_heads)
    imp = import_hf(hf_dir)
    mc = imp.model.cfg
    assert (mc.style, mc.tie_embeddings, mc.kv_heads) == (arch, tie, kv_heads)
    assert (mc.rope_theta, mc.norm_eps, mc.max_seq_len) == (5000.0, 1e-5, 64)
    assert not imp.changed
    x = tokens()
    assert max_diff(imp.model(x), hf_logits(ref, x)) < 1e-4


@pytest.mark.parametrize(("strategy", "overrides"), [
    ("unified", ["scale.mlp.placement=dual"]),  # HG + DP + OR everywhere, the MLP kept pure
    ("hg", []), ("er", []), ("no_scale", []),
])
def test_retrofit_preserves_function(tmp_path, strategy, overrides):
    hf_dir, ref = save_hf(tmp_path, "llama", tie=True)
    imp = import_hf(hf_dir, strategy, overrides)
    assert not imp.changed and imp.check["max_abs_logit_diff"] < 1e-4
    x = tokens()
    assert max_diff(imp.model(x), hf_logits(ref, x)) < 1e-4
    if strategy == "unified":  # HG copies the shared γ into every branch; DP starts with γ_a = 1
        qkv, gamma = imp.model.blocks[0].attn.qkv, ref.model.layers[0].input_layernorm.weight
        for b in ("q", "k", "v"):
            torch.testing.assert_close(qkv.gains.inputs()[b], gamma.detach())
            torch.testing.assert_close(qkv.gains.out_gains[b](), torch.ones(qkv.gains.out_gains[b].dim))
        assert qkv.gains.in_gain.param == "or"


def test_import_reads_sharded_and_bin_checkpoints(tmp_path):
    ref = hf_model("llama", tie=False)
    ref.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    ref.config.save_pretrained(tmp_path / "bin")
    torch.save(ref.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    x = tokens()
    for folder in ("sharded", "bin"):
        assert max_diff(import_hf(tmp_path / folder).model(x), hf_logits(ref, x)) < 1e-4


def test_dnp_is_refused_unless_allowed_and_then_measured(tmp_path):
    hf_dir, ref = save_hf(tmp_path, "llama")
    with pytest.raises(ConfigError, match=r"blocks\.\*\.ffn\.gate_up .*dual_norm.*--allow-function-change"):
        import_hf(hf_dir, "unified")
    imp = import_hf(hf_dir, "unified", allow_function_change=True)
    assert sorted(imp.changed) == ["blocks.0.ffn.gate_up", "blocks.1.ffn.gate_up"]
    assert imp.check["kl_per_token"] > 0 and imp.check["max_abs_logit_diff"] > 1e-3
    x = tokens()
    assert max_diff(imp.model(x), hf_logits(ref, x)) > 1e-3


def test_qwen3_qk_gain_cannot_be_dropped(tmp_path):
    hf_dir, _ = save_hf(tmp_path, "qwen3", tie=False)
    with pytest.raises(ConfigError, match=r"blocks\.\*\.attn\.q_norm, blocks\.\*\.attn\.k_norm"):
        import_hf(hf_dir, "no_scale")


@pytest.mark.parametrize(("change", "message"), [
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "RoPE scaling 'llama3'"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}}, "RoPE scaling 'yarn'"),
    ({"attention_bias": True}, "attention_bias"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"head_dim": 32}, "head_dim=32"),
    ({"model_type": "mistral"}, "model_type 'mistral'"),
    ({"model_type": "scalevec", "post_norm": True}, "post_norm=true with qk_norm=false"),
])
def test_import_refuses_what_scalevec_cannot_compute(change, message):
    c = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2,
         "intermediate_size": 96, "vocab_size": VOCAB, "rope_theta": 10000.0}
    assert model_config_from_hf(c).head_dim == 16
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        model_config_from_hf({**c, **change})


# ---------------------------------------------------------------------------------------------- export


def scalevec_model(style: str, strategy: str, *overrides: str, tie: bool = False, steps: int = 3):
    """A tiny scalevec model after a few AdamW steps at a high LR, so every gain is far from its init."""
    mc = model_preset("tiny")
    mc.vocab_size, mc.style, mc.tie_embeddings, mc.d_model, mc.n_layers = VOCAB, style, tie, 48, 2
    mc.n_kv_heads, mc.d_ff, mc.max_seq_len = 2, 80, 64
    torch.manual_seed(0)
    model = build_model(mc, load_config(None, [f"scale.strategy={strategy}", *overrides]).scale)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-2)
    for step in range(steps):
        x = tokens(32, seed=10 + step)
        model(x, x.roll(-1, 1)).backward()
        opt.step()
        opt.zero_grad()
    if steps:
        gains = [m() for m in model.modules() if isinstance(m, ScaleVector)]
        assert gains and all((g - 1).abs().max() > 1e-2 for g in gains)
    return model.eval()


@pytest.mark.parametrize(("style", "strategy", "overrides", "tie", "architecture"), [
    ("llama", "unified", ["scale.mlp.placement=dual"], True, "LlamaForCausalLM"),
    ("llama", "dp", [], False, "LlamaForCausalLM"),
    ("qwen3", "or", [], True, "Qwen3ForCausalLM"),
    ("gemma", "hg", [], True, "Gemma3ForCausalLM"),
])
def test_export_after_training_loads_in_transformers(tmp_path, style, strategy, overrides, tie, architecture):
    model = scalevec_model(style, strategy, *overrides, tie=tie)
    export_hf(model, tmp_path / "out")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(hf).__name__ == architecture
    x = tokens(40)
    with torch.no_grad():
        ours = model(x)
        assert max_diff(hf_logits(hf, x), ours) < 1e-4
        assert max_diff(fold(model)(x), ours) < 1e-4  # the same function as the library fold
    tied = json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"]
    assert tied == (tie and style != "gemma")  # Gemma scales the embedding by √d, so its head cannot be it


def test_import_then_export_is_the_identity(tmp_path):
    hf_dir, _ = save_hf(tmp_path, "llama", tie=True)
    export_hf(import_hf(hf_dir).model, tmp_path / "out")
    a, b = load_file(hf_dir / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    assert a.keys() == b.keys() and "lm_head.weight" not in b
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(("strategy", "style", "message"), [
    ("unified", "llama", (r"as LlamaForCausalLM: blocks\.\*\.ffn\.gate_up \(scale\.mlp\.placement=dual_norm.*"
                          r"--arch custom .*trust_remote_code=True, or train with scale\.mlp\.placement=dual for")),
    ("dnp", "gemma", r"blocks\.\*\.ffn\.gate_up .*Gemma3ForCausalLM"),
])
def test_native_export_refuses_dnp_naming_the_options(tmp_path, strategy, style, message):
    model = scalevec_model(style, strategy, steps=0)
    with pytest.raises(ConfigError, match=message):
        export_hf(model, tmp_path / "out", arch="native")
    assert not (tmp_path / "out").exists()


def greedy(model, prompt: torch.Tensor, n: int) -> torch.Tensor:
    """Greedy continuation by recomputing the whole sequence: the reference for ``generate``."""
    with torch.no_grad():
        for _ in range(n):
            prompt = torch.cat([prompt, model(prompt)[:, -1].argmax(-1, keepdim=True)], 1)
    return prompt


@pytest.mark.parametrize(("style", "strategy", "overrides", "tie", "arch"), [
    ("llama", "unified", [], True, "auto"),  # the paper's strategy: DNP on gate/up, with HG + DP + OR
    ("gemma", "dnp", ["scale.attn.placement=dual_norm"], False, "auto"),  # DNP per head on q/k/v, QK/post norms
    ("qwen3", "unified", ["scale.attn.placement=norm_output", "scale.final.placement=dual"], True, "auto"),
    ("llama", "dp", [], False, "custom"),  # a foldable strategy, asked for as custom code
])
def test_custom_code_export_loads_with_trust_remote_code(tmp_path, style, strategy, overrides, tie, arch):
    model = scalevec_model(style, strategy, *overrides, tie=tie)
    notes = export_hf(model, tmp_path / "out", arch=arch)
    assert ("writing the custom-code ScalevecForCausalLM" in notes[0]) == (arch == "auto")
    assert notes[-1].endswith("trust_remote_code=True)")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == "scalevec" and config["architectures"] == ["ScalevecForCausalLM"]
    for module in config["auto_map"].values():  # the custom code is in the folder, and needs no scalevec
        code = (tmp_path / "out" / f"{module.split('.')[0]}.py").read_text()
        assert "import scalevec" not in code and "from scalevec" not in code
    weights = load_file(tmp_path / "out" / "model.safetensors")
    dnp_mlp = model.scale.mlp.has_norm
    assert ("model.layers.1.mlp.up_proj_norm.weight" in weights) == dnp_mlp
    assert ("model.layers.0.self_attn.q_proj_norm.weight" in weights) == model.scale.attn.has_norm

    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True).eval()
    assert type(hf).__name__ == "ScalevecForCausalLM"
    x = tokens(40)
    with torch.no_grad():
        assert max_diff(hf_logits(hf, x), model(x)) < 1e-4
        assert abs(hf(x, labels=x).loss.item() - model(x[:, :-1], x[:, 1:]).item()) < 1e-5
        ids = hf.generate(x[:, :6], max_new_tokens=10, do_sample=False)
        assert torch.equal(ids, greedy(model, x[:, :6], 10))
        # Left padding: the padded row continues as it does alone, and the other row is unaffected.
        padded = torch.cat([torch.zeros(2, 3, dtype=torch.long), x[:, :6]], 1)
        mask = torch.ones_like(padded)
        padded[1, :3], mask[0, :3] = x[1, :3], 0
        both = hf.generate(padded, attention_mask=mask, max_new_tokens=10, do_sample=False)
        assert torch.equal(both[0, 3:], ids[0]) and torch.equal(both[1], greedy(model, padded[1:], 10)[0])


@pytest.mark.parametrize(("style", "strategy", "overrides"), [
    ("llama", "unified", []),
    ("gemma", "dnp", ["scale.attn.placement=dual_norm"]),
])
def test_custom_code_export_imports_back_exactly(tmp_path, style, strategy, overrides):
    model = scalevec_model(style, strategy, *overrides, tie=True)
    export_hf(model, tmp_path / "out")
    with pytest.raises(ConfigError, match=r"blocks\.\*\.ffn\.gate_up \(scale\.mlp\.placement=input drops the "
                                          r"checkpoint's norm between W and γ_a; scale\.mlp\.placement=dual_norm"):
        import_hf(tmp_path / "out")  # baseline has no place for DNP's norm
    imp = import_hf(tmp_path / "out", strategy, overrides)
    assert imp.architecture == "ScalevecForCausalLM" and imp.model.cfg.style == style and not imp.changed
    assert imp.check["max_abs_logit_diff"] < 1e-4
    x = tokens(40)
    with torch.no_grad():
        assert max_diff(imp.model(x), model(x)) < 1e-4
    export_hf(imp.model, tmp_path / "again")  # and back out: the same tensors, up to OR's round-off
    a, b = load_file(tmp_path / "out" / "model.safetensors"), load_file(tmp_path / "again" / "model.safetensors")
    assert a.keys() == b.keys() and all(max_diff(a[k], b[k]) < 1e-5 for k in a)


def test_export_refuses_moe(tmp_path):
    mc = model_preset("moe-tiny")
    mc.vocab_size, mc.n_layers = VOCAB, 1
    with pytest.raises(ConfigError, match="mixture of experts"):
        export_hf(build_model(mc, load_config(None, []).scale), tmp_path / "out")


@pytest.mark.parametrize("kind", ["bpe", "gpt2", "byte"])
def test_tokenizer_export_encodes_like_the_run(tmp_path, kind):
    from scalevec.data import ByteTokenizer, gpt2_tokenizer, train_bpe
    from scalevec.hf import export_tokenizer

    docs = ["To be, or not to be, that is the question:", "Whether 'tis nobler in the mind to suffer"] * 10
    tok = {"bpe": lambda: train_bpe(docs, 300), "gpt2": gpt2_tokenizer, "byte": ByteTokenizer}[kind]()
    export_tokenizer(tok, tmp_path, 64)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    text = "Hello  world!\n\n  Ünïcödé ✓ they'll   tabs\there 123 4567 end  "
    ids = tok.encode(text)
    assert hf(text)["input_ids"] == [tok.eot_id, *ids]  # a text starts a document, as in training
    assert hf.decode(ids) == tok.decode(ids) and hf.eos_token_id == tok.eot_id


# ---------------------------------------------------------------------------------------------- sampling


@pytest.mark.parametrize("style", ["llama", "gemma"])
def test_kv_cache_matches_full_forward(style):
    model = scalevec_model(style, "unified", steps=0)
    x = tokens(20)
    cache = KVCache(model, 2, 20)
    with torch.no_grad():
        chunks = [model(x[:, :7], cache=cache), model(x[:, 7:12], cache=cache)]  # prefill, then a chunk
        chunks += [model(x[:, i:i + 1], cache=cache) for i in range(12, 20)]
        assert max_diff(torch.cat(chunks, 1), model(x)) < 1e-5


def test_cached_greedy_equals_uncached_greedy():
    model = scalevec_model("llama", "dp", steps=0)
    prompt = tokens(5)
    out = generate(model, prompt, 12, temperature=0.0)
    ref = prompt
    with torch.no_grad():
        for _ in range(12):
            ref = torch.cat([ref, model(ref)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, ref)
    # top-k = 1 sampling is greedy; a seeded generator makes sampling reproducible
    assert torch.equal(generate(model, prompt, 12, temperature=1.0, top_k=1), ref)
    s1, s2 = (generate(model, prompt, 12, 1.0, None, torch.Generator().manual_seed(3)) for _ in range(2))
    assert torch.equal(s1, s2)


def test_generation_stops_at_eos():
    model = scalevec_model("llama", "baseline", steps=0)
    prompt = tokens(4)
    greedy = generate(model, prompt, 10, temperature=0.0)
    eos = greedy[0, 6].item()  # the third generated token of the first row
    out = generate(model, prompt, 10, temperature=0.0, eos_id=eos)
    first = (out[0, 4:] == eos).nonzero()[0].item()
    assert (out[0, 4 + first:] == eos).all() and out.shape[1] <= greedy.shape[1]
    with pytest.raises(ValueError, match="max_seq_len"):
        generate(model, prompt, 61)


# ---------------------------------------------------------------------------------------------- CLI


def hf_dir_with_tokenizer(tmp_path: Path, monkeypatch):
    """A tiny GQA, tied Llama saved with a BPE trained on a corpus beside it: (model, tokenizer)."""
    from scalevec.data import train_bpe

    monkeypatch.setenv("SCALEVEC_CACHE", str(tmp_path / "cache"))
    text = "".join(f"Line {i}: the gain of layer {i % 7} grows with its weights.\n" for i in range(400))
    (tmp_path / "corpus.txt").write_text(text)
    tok = train_bpe(text.splitlines(), 300)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=tok.vocab_size, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True))
    hf.save_pretrained(tmp_path / "hf")
    tok.tokenizer.save(str(tmp_path / "hf" / "tokenizer.json"))
    return hf, tok


def test_cli_import_train_export_sample(tmp_path, monkeypatch, capsys):
    """The documented workflow end to end: import a GQA, tied Llama with its tokenizer under a retrofitted
    strategy, train a few steps, export, and load the export in transformers."""
    from scalevec.cli import main
    from scalevec.train import load_run

    hf, tok = hf_dir_with_tokenizer(tmp_path, monkeypatch)
    run, out = tmp_path / "run", tmp_path / "export"

    assert main(["import", str(tmp_path / "hf"), "--strategy", "unified", "scale.mlp.placement=dual",
                 f"data.source={tmp_path / 'corpus.txt'}", "data.val_tokens=1024", "train.precision=fp32",
                 "--out", str(run)]) == 0
    assert "function preserved" in capsys.readouterr().out
    saved = (run / "config.toml").read_text()
    assert 'preset = "custom"' in saved and "d_model = 48" in saved  # every shape field explicit
    assert main(["train", "--resume", str(run), "train.steps=3", "train.batch_size=4", "train.seq_len=32",
                 "train.progress=false", "train.eval_every=0"]) == 0
    assert main(["export", str(run), "--out", str(out)]) == 0
    loaded = load_run(run)
    assert loaded.step == 3
    exported = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    x = torch.randint(0, tok.vocab_size, (2, 32))
    with torch.no_grad():
        assert max_diff(hf_logits(exported, x), loaded.model(x)) < 1e-4
        assert max_diff(hf_logits(exported, x), hf_logits(hf.eval(), x)) > 1e-4  # training moved it
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert hf_tok("the scale")["input_ids"] == [tok.eot_id, *tok.encode("the scale")]

    capsys.readouterr()
    assert main(["sample", str(run), "--prompt", "the scale", "--max-new-tokens", "5", "--seed", "1"]) == 0
    assert capsys.readouterr().out.startswith("the scale")
    assert main(["export", str(run), "--out", str(out)]) == 2  # never overwrites


def test_cli_exports_unified_as_custom_code(tmp_path, monkeypatch, capsys):
    """The README tour's export of a DNP run: custom code by default, a one-line refusal naming both ways out
    with --arch native, and printed commands whose paths survive pasting into a shell."""
    from scalevec.cli import main
    from scalevec.commands.hf import ARCHS
    from scalevec.hf import ARCHS as HF_ARCHS
    from scalevec.train import load_run

    assert ARCHS == HF_ARCHS
    _, tok = hf_dir_with_tokenizer(tmp_path, monkeypatch)
    run, out = tmp_path / "unified run", tmp_path / "export"
    assert main(["import", str(tmp_path / "hf"), "--strategy", "unified", f"data.source={tmp_path / 'corpus.txt'}",
                 "--allow-function-change", "--out", str(run)]) == 0
    assert f"scalevec train --resume '{run}' train.steps=N" in capsys.readouterr().out

    assert main(["export", str(run), "--arch", "native", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--arch custom" in err and "scale.mlp.placement=dual for a plain one" in err
    assert main(["export", str(run), "--out", str(out)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert "writing the custom-code ScalevecForCausalLM" in printed[0]
    assert printed[-1] == f"load it with: AutoModelForCausalLM.from_pretrained('{out}', trust_remote_code=True)"
    exported = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    x = torch.randint(0, tok.vocab_size, (2, 32))
    with torch.no_grad():
        assert max_diff(hf_logits(exported, x), load_run(run).model(x)) < 1e-4
    hf_tok = transformers.AutoTokenizer.from_pretrained(out, trust_remote_code=True)  # it reads config.json
    ids = exported.generate(**hf_tok("the gain", return_tensors="pt"), max_new_tokens=5, do_sample=False)
    assert hf_tok.decode(ids[0]).startswith("<|endoftext|>the gain")
