"""The hand-written CPU kernel of DNP's SwiGLU (``scalevec::dnp_swiglu``): the same function and gradients as the
PyTorch formulation, for every dtype it takes, any width, strided inputs and any number of rows; deterministic
across thread counts; registered so that tracing and double backward work; and a build that fails, or is
switched off, falls back with one warning instead of failing the run."""

from __future__ import annotations

import warnings

import pytest
import torch

from scalevec.ops import dnp_swiglu as kernel_ops
from scalevec.ops.dnp_swiglu import DNPSwiGLU, dnp_swiglu

# The kernel's own tests need it built; the fallback tests at the end run everywhere, above all without a compiler.
needs_kernel = pytest.mark.usefixtures("cpu_kernel")


def _inputs(rows: int, width: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    gate_up = (3 * torch.randn(rows, 2 * width, generator=g)).to(dtype)
    gain = 1 + 0.3 * torch.randn(width, generator=g)
    dh = torch.randn(rows, width, generator=g).to(dtype)
    return gate_up, gain, dh


def _run(fn, gate_up, gain, dh):
    gate_up, gain = gate_up.detach().clone().requires_grad_(), gain.detach().clone().requires_grad_()
    h = fn(gate_up, gain)
    h.backward(dh.to(h.dtype))
    return h.detach(), gate_up.grad, gain.grad


def _kernel(gate_up, gain):
    assert kernel_ops.applies(gate_up)
    return dnp_swiglu(gate_up, gain, 1e-6)


def _reference(gate_up, gain):  # the PyTorch formulation in float64
    return DNPSwiGLU.apply(gate_up.double(), gain.double(), 1e-6)


# Widths: whole vector chunks, a partial last chunk, and narrower than one chunk; rows: not a multiple of the
# kernel's 64-row blocks of γ's gradient.
@pytest.mark.slow
@pytest.mark.slow
@pytest.mark.slow
@pytest.mark.slow
@needs_kernel
@pytest.mark.parametrize("width,rows", [(512, 130), (48, 70), (37, 3)])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2), (torch.float16, 2e-3)])
def test_kernel_matches_the_pytorch_formulation(width, rows, dtype, tol):
    gate_up, gain, dh = _inputs(rows, width, dtype)
    got, want = _run(_kernel, gate_up, gain, dh), _run(_reference, gate_up, gain, dh)
    assert got[0].dtype == dtype and got[1].dtype == dtype and got[2].dtype == torch.float32
    for name, a, b in zip(("h", "d gate_up", "d gain"), got, want):
        err = ((a.double() - b).abs().max() / b.abs().max()).item()
        assert err < tol, f"{name}: relative error {err:.2e}"
@needs_kernel
def test_kernel_reads_strided_and_batched_inputs():
    """A projection output sliced out of a wider tensor (row stride > width), a transposed one (last dimension
    not contiguous) and leading batch dimensions give what the contiguous rows give."""
    gate_up, gain, dh = _inputs(96, 64, torch.bfloat16)
    want = _run(_kernel, gate_up, gain, dh)
    wide = torch.zeros(96, 200, dtype=torch.bfloat16)
    wide[:, 5:133] = gate_up
    transposed = gate_up.t().contiguous().t()
    batched = gate_up.view(4, 24, 128)
    for x, d in ((wide[:, 5:133], dh), (transposed, dh), (batched, dh.view(4, 24, 64))):
        got = _run(_kernel, x, gain, d)
        for a, b in zip(got, want):
            torch.testing.assert_close(a.reshape(b.shape), b, rtol=0, atol=0)
@needs_kernel
def test_gain_gradient_does_not_depend_on_the_thread_count():
    gate_up, gain, dh = _inputs(1000, 256, torch.bfloat16)
    threads = torch.get_num_threads()
    try:
        grads = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            grads.append(_run(_kernel, gate_up, gain, dh)[2])
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(grads[0], g) for g in grads[1:])
@needs_kernel
def test_double_backward_matches_the_pytorch_formulation():
    """A differentiable backward (create_graph) runs the PyTorch formula of the gradients."""
    gate_up, gain, _ = _inputs(8, 32, torch.float32)

    def second_order(use_kernel: bool):
        x, g = gate_up.clone().requires_grad_(), gain.clone().requires_grad_()
        if use_kernel:
            h = dnp_swiglu(x, g, 1e-6)
        else:
            with kernel_ops.disabled():
                h = dnp_swiglu(x, g, 1e-6)
        dx, = torch.autograd.grad(h.square().sum(), x, create_graph=True)
        return torch.autograd.grad(dx.sum(), (x, g))

    for a, b in zip(second_order(True), second_order(False)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.slow
@pytest.mark.slow
@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_operator_registration(dtype):
    """Schema, fake (shape) function, autograd registration and AOT tracing, checked by torch itself."""
    gate_up, gain, _ = _inputs(2 * 16, 48, dtype)
    torch.library.opcheck(torch.ops.scalevec.dnp_swiglu.default,
                          (gate_up.view(2, 16, 96).requires_grad_(), gain.requires_grad_(), 1e-6))
@needs_kernel
def test_disabled_runs_the_pytorch_formulation():
    gate_up, gain, _ = _inputs(16, 32, torch.bfloat16)
    with kernel_ops.disabled():
        assert not kernel_ops.applies(gate_up)
        got = dnp_swiglu(gate_up, gain, 1e-6)
    assert kernel_ops.applies(gate_up)
    assert not kernel_ops.applies(gate_up.double())
    torch.testing.assert_close(got, DNPSwiGLU.apply(gate_up, gain, 1e-6), rtol=0, atol=0)
@needs_kernel
def test_bad_input_is_refused_with_a_named_reason():
    with pytest.raises(RuntimeError, match=r"gate_up must hold \[gate \| up\]"):
        torch.ops.scalevec.dnp_swiglu(torch.ones(4, 7), torch.ones(3), 1e-6)
    with pytest.raises(RuntimeError, match="gain must be a vector of the branch width"):
        torch.ops.scalevec.dnp_swiglu(torch.ones(4, 8), torch.ones(3), 1e-6)


def test_a_failed_build_falls_back_with_one_warning(monkeypatch):
    def broken():
        raise RuntimeError("Error building extension 'x': g++ exited with 1\n<a page of compiler output>")

    monkeypatch.setattr(kernel_ops, "_tried", False)
    monkeypatch.setattr(kernel_ops, "_ready", False)
    monkeypatch.setattr(kernel_ops, "_build", broken)
    monkeypatch.delenv(kernel_ops.ENV, raising=False)
    with pytest.warns(RuntimeWarning, match=r"CPU kernels not built \(Error building extension 'x': g\+\+ exited "
                                            r"with 1\); DNP runs its PyTorch formulation") as caught:
        assert not kernel_ops.load()
    assert "compiler output" not in str(caught[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not kernel_ops.load()  # tried once: no second build, no second warning
    gate_up, gain, _ = _inputs(4, 16, torch.float32)
    assert not kernel_ops.applies(gate_up)
    dnp_swiglu(gate_up, gain, 1e-6)


def test_switched_off_by_the_environment(monkeypatch):
    monkeypatch.setattr(kernel_ops, "_tried", False)
    monkeypatch.setattr(kernel_ops, "_ready", False)
    monkeypatch.setenv(kernel_ops.ENV, "0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not kernel_ops.load()
