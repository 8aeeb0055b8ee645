"""What running on a GPU image needs of the library (issue 24): no C++ kernel build from a model constructor,
GQA attention through SDPA's ``enable_gqa``, configs readable without ``tomli_w``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from scalevec.models import KVCache, build_model, model_preset
from scalevec.ops import dnp_swiglu as kernel_ops
from scalevec.strategy import preset

SRC = Path(__file__).resolve().parents[1] / "src"


def gqa_model(strategy: str = "unified", style: str = "llama"):
    mc = model_preset("tiny")
    mc.vocab_size, mc.style, mc.d_model, mc.n_layers, mc.n_heads, mc.n_kv_heads = 96, style, 64, 2, 4, 2
    mc.d_ff, mc.max_seq_len = 128, 64
    torch.manual_seed(0)
    return build_model(mc, preset(strategy))


def test_model_constructors_build_no_kernel_and_enable_builds_it_on_cpu_only(monkeypatch):
    calls = []
    monkeypatch.setattr(kernel_ops, "load", lambda: calls.append(1) or True)
    model = gqa_model("unified")
    moe = model_preset("moe-tiny")
    moe.vocab_size = 96
    moe_model = build_model(moe, preset("unified"))
    assert calls == []  # constructing DNP models (dense and MoE) builds nothing
    assert not kernel_ops.enable(gqa_model("baseline"))  # no DNP SwiGLU: nothing to build
    assert not kernel_ops.enable(model.to("meta"))  # not on CPU (as on a GPU): nothing to build
    assert calls == []
    assert kernel_ops.enable(gqa_model("unified")) and kernel_ops.enable(moe_model)
    assert calls == [1, 1]


@pytest.mark.parametrize("style", ["llama", "gemma"])
def test_gqa_through_enable_gqa_matches_repeated_kv_heads(monkeypatch, style):
    """Full forward, its gradients, and KV-cached decoding (prefill, a chunk with the offset mask, single tokens)
    against the same model with K/V heads copied by ``repeat_interleave``, on CPU in fp32 and under bf16 autocast."""
    sdpa = F.scaled_dot_product_attention
    seen = []

    def repeated(q, k, v, attn_mask=None, is_causal=False, enable_gqa=False):
        seen.append(enable_gqa)
        if enable_gqa:
            k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], 1) for t in (k, v))
        return sdpa(q, k, v, attn_mask=attn_mask, is_causal=is_causal)

    model = gqa_model("unified", style)
    x = torch.randint(0, 96, (2, 20), generator=torch.Generator().manual_seed(1))

    def run():
        model.zero_grad()
        model(x, x.roll(-1, 1)).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        with torch.no_grad():
            cache = KVCache(model, 2, 20)
            chunks = [model(x[:, :7], cache=cache), model(x[:, 7:12], cache=cache)]
            chunks += [model(x[:, i:i + 1], cache=cache) for i in range(12, 20)]
            with torch.autocast("cpu", dtype=torch.bfloat16):
                bf16 = model(x)
        return grads, torch.cat(chunks, 1), bf16

    grads, cached, bf16 = run()
    monkeypatch.setattr(F, "scaled_dot_product_attention", repeated)
    ref_grads, ref_cached, ref_bf16 = run()
    assert seen and all(seen)  # every attention call asked SDPA for GQA
    torch.testing.assert_close(cached, ref_cached, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bf16, ref_bf16, rtol=1e-5, atol=1e-5)
    assert grads.keys() == ref_grads.keys()
    for n in grads:
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-5, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")


def test_configs_load_without_tomli_w():
    """A GPU image without ``tomli_w`` reads configs and trains; only writing a config needs it."""
    code = ("import sys; sys.modules['tomli_w'] = None\n"
            "from scalevec.config import load_config\n"
            "cfg = load_config(None, ['model.preset=tiny', 'scale.strategy=unified'])\n"
            "try:\n    cfg.to_toml()\nexcept ImportError:\n    print('to_toml needs tomli_w')\n")
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, env=env,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "to_toml needs tomli_w"
