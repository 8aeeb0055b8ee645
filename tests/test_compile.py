"""The compiled hot path: no graph break for any strategy preset, and the hand-written autograd functions the
layers use (``scaled_weight``, ``dnp_swiglu``) are exact, differentiable twice and traceable."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F

from scalevec.layers import scaled_weight
from scalevec.models import build_model, model_preset
from scalevec.ops import dnp_swiglu as kernel_ops
from scalevec.ops.dnp_swiglu import dnp_swiglu
from scalevec.strategy import PRESETS, preset
from scalevec.train.trainer import cpu_compiler_available


def tiny(strategy: str, style: str = "llama", moe: bool = False):
    mc = model_preset("moe-tiny" if moe else "tiny")
    mc.vocab_size, mc.style, mc.d_model, mc.n_layers, mc.n_kv_heads, mc.d_ff = 96, style, 64, 2, 2, 128
    if moe:
        mc.moe.d_expert = 64
    torch.manual_seed(0)
    return build_model(mc, preset(strategy))


def compiled_loss(model, backend: str, autocast: bool = True) -> torch.Tensor:
    torch._dynamo.reset()
    step = torch.compile(model, backend=backend, fullgraph=True)  # fullgraph: a graph break raises
    x = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = step(x, x.roll(-1, 1))
        aux = model.aux_loss()
    return loss if aux is None else loss + aux


@pytest.mark.slow
@pytest.mark.parametrize("style", ["llama", "gemma"])
@pytest.mark.parametrize("strategy", PRESETS)
def test_no_graph_break_dense(strategy, style):
    compiled_loss(tiny(strategy, style), "eager").backward()


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["baseline", "dnp", "unified"])
def test_no_graph_break_moe(strategy):
    compiled_loss(tiny(strategy, moe=True), "eager").backward()


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["dp", "dnp", "unified"])
def test_compiled_graph_matches_eager(strategy):
    """AOT autograd traces the custom backward functions; loss and every gradient match eager in fp32."""
    eager, traced = tiny(strategy), tiny(strategy)
    x = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))
    eager(x, x.roll(-1, 1)).backward()
    loss = compiled_loss(traced, "aot_eager", autocast=False)
    loss.backward()
    torch.testing.assert_close(loss, eager(x, x.roll(-1, 1)))
    for (name, p), q in zip(eager.named_parameters(), traced.parameters()):
        torch.testing.assert_close(q.grad, p.grad, msg=name)


def test_scaled_weight_is_exact_and_twice_differentiable():
    g = torch.Generator().manual_seed(0)
    w, v, u = (torch.randn(*s, generator=g, dtype=torch.float64, requires_grad=True) for s in ((5, 4), (4,), (5,)))
    for args in ((w, v, u), (w, v, None), (w, None, u)):
        assert torch.autograd.gradcheck(scaled_weight, args)
        assert torch.autograd.gradgradcheck(scaled_weight, args)
    torch.testing.assert_close(scaled_weight(w, v, u), u[:, None] * w * v)
    assert scaled_weight(w) is w


def test_dnp_swiglu_is_exact_and_twice_differentiable():
    """float64 runs the PyTorch formulation (the CPU kernel takes fp32/bf16/fp16; ``test_cpu_kernels``)."""
    g = torch.Generator().manual_seed(0)
    gate_up = torch.randn(2, 3, 16, generator=g, dtype=torch.float64, requires_grad=True)
    gain = (1 + 0.3 * torch.randn(8, generator=g, dtype=torch.float64)).requires_grad_()

    def f(a, c):
        return dnp_swiglu(a, c, 1e-6)

    assert torch.autograd.gradcheck(f, (gate_up, gain))
    assert torch.autograd.gradgradcheck(f, (gate_up, gain))
    gate, up = gate_up.chunk(2, -1)
    ref = F.silu(F.rms_norm(gate, (8,), gain, 1e-6)) * F.rms_norm(up, (8,), None, 1e-6)
    torch.testing.assert_close(f(gate_up, gain), ref)


@pytest.mark.parametrize("kernel", [True, False], ids=["cpu-kernel", "pytorch"])
def test_dnp_swiglu_bf16_matches_fp32_reference(kernel, request):
    """bf16 branches (autocast) are normalised in fp32 inside: the result is the fp32 one rounded to bf16."""
    if kernel:
        request.getfixturevalue("cpu_kernel")
    g = torch.Generator().manual_seed(0)
    gate_up = torch.randn(64, 64, generator=g).bfloat16()
    gain = 1 + 0.3 * torch.randn(32, generator=g)
    with contextlib.nullcontext() if kernel else kernel_ops.disabled():
        out = dnp_swiglu(gate_up, gain, 1e-6)
    gate, up = gate_up.float().chunk(2, -1)
    ref = F.silu(F.rms_norm(gate, (32,), gain, 1e-6)) * F.rms_norm(up, (32,), None, 1e-6)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=8e-3, atol=8e-3)


@pytest.mark.parametrize("kernel", [True, False], ids=["cpu-kernel", "pytorch"])
def test_dnp_swiglu_bf16_gradients_match_fp32_within_bf16_rounding(kernel, request):
    """With bf16 branches γ_gate's gradient stays within bf16 rounding of the fp32 one, like every weight
    gradient under autocast (the PyTorch formulation sums it as a bf16 ones-vector matmul; the kernel in fp32)."""
    if kernel:
        request.getfixturevalue("cpu_kernel")
    g = torch.Generator().manual_seed(0)
    gate_up32 = torch.randn(512, 128, generator=g)
    w = torch.randn(512, 64, generator=g)
    gain32 = (1 + 0.3 * torch.randn(64, generator=g)).requires_grad_()
    gate32, up32 = gate_up32.chunk(2, -1)
    ref = F.silu(F.rms_norm(gate32, (64,), gain32, 1e-6)) * F.rms_norm(up32, (64,), None, 1e-6)
    (ref * w).sum().backward()
    gain = gain32.detach().clone().requires_grad_()
    with contextlib.nullcontext() if kernel else kernel_ops.disabled():
        (dnp_swiglu(gate_up32.bfloat16().requires_grad_(), gain, 1e-6).float() * w).sum().backward()
    assert gain.grad.dtype == torch.float32
    torch.testing.assert_close(gain.grad, gain32.grad, rtol=3e-2, atol=3e-2 * gain32.grad.abs().mean().item())


def test_bf16_autocast_loss_close_to_fp32():
    """Attention runs in fp32 under CPU autocast; the bf16 path stays within bf16 rounding of fp32."""
    m = tiny("unified", "gemma")
    x = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))
    ref = m(x, x.roll(-1, 1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = m(x, x.roll(-1, 1))
    torch.testing.assert_close(loss, ref, rtol=2e-2, atol=0)


@pytest.mark.slow
def test_compile_settings_are_scoped_to_the_compiled_model(monkeypatch):
    """The partitioner settings hold while the graph compiles and nowhere else; inductor gets its options."""
    import torch._functorch.config as functorch_config
    import torch._inductor.compile_fx

    from scalevec.train import compiling

    seen = {}

    def fake_compile_fx(gm, example_inputs, config_patches=None):
        seen.update({k: getattr(functorch_config, k) for k in compiling.PARTITIONER}, patches=config_patches)
        return gm.forward

    monkeypatch.setattr(torch._inductor.compile_fx, "compile_fx", fake_compile_fx)
    before = {k: getattr(functorch_config, k) for k in compiling.PARTITIONER}
    assert before != compiling.PARTITIONER  # else this test could not tell
    torch._dynamo.reset()
    model = tiny("unified")
    x = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(compiling.compile_model(model)(x, x.roll(-1, 1)), model(x, x.roll(-1, 1)))
    assert seen.pop("patches") == compiling.INDUCTOR
    assert seen == compiling.PARTITIONER
    assert {k: getattr(functorch_config, k) for k in compiling.PARTITIONER} == before


@pytest.mark.slow
@pytest.mark.skipif(not cpu_compiler_available(), reason="inductor's CPU code needs a C++ compiler and Python.h")
@pytest.mark.parametrize("strategy", ["baseline", "unified"])
def test_compiled_model_trains_like_eager(strategy):
    """The trainer's compile (inductor, recomputing in backward what the default partitioner saves) gives eager's
    loss and gradients, fp32."""
    from scalevec.train.compiling import compile_model

    torch._dynamo.reset()
    mc = model_preset("tiny")
    mc.vocab_size, mc.d_model, mc.n_layers, mc.d_ff = 96, 32, 1, 64
    torch.manual_seed(0)
    eager = build_model(mc, preset(strategy))
    torch.manual_seed(0)
    traced = build_model(mc, preset(strategy))
    x = torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(0))
    ref = eager(x, x.roll(-1, 1))
    ref.backward()
    loss = compile_model(traced)(x, x.roll(-1, 1))
    loss.backward()
    torch.testing.assert_close(loss, ref)
    for (name, p), q in zip(eager.named_parameters(), traced.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, msg=name, rtol=1e-4, atol=1e-6)
