"""DNP's SwiGLU, ``silu(γ ⊙ RMSNorm(gate)) ⊙ RMSNorm(up)``, as one operator: a PyTorch formulation with a
hand-derived backward, and on CPU a hand-written kernel (``csrc/dnp_swiglu.cpp``, ``scalevec::dnp_swiglu``).

Both keep only what plain SwiGLU keeps for backward. The kernel reads each row once per direction, where the code
``torch.compile`` generates reads it once per row statistic (``docs/performance.md``). :func:`enable` builds it
with torch's C++ extension loader for a model on CPU that runs the op: once per machine, CPU capability and torch
version, cached in torch's extension directory (``TORCH_EXTENSIONS_DIR``); model constructors never build it.
Where it cannot be built, or with ``SCALEVEC_CPU_KERNELS=0``, the PyTorch formulation runs: the same function,
equal up to floating-point rounding (the kernel's sigmoid uses a polynomial exp; it sums γ's gradient in fp32).
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import shutil
import subprocess
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ENV = "SCALEVEC_CPU_KERNELS"
CSRC = Path(__file__).parent / "csrc"
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Instruction sets the build targets, by the capability torch dispatches to on this CPU (what inductor uses too).
_ARCH_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512dq", "-mavx512vl", "-mavx512bw", "-mfma"],
    "AVX2": ["-mavx2", "-mfma"],
}

_tried = False
_ready = False  # read by traced code: a plain module global, so torch.compile guards on it
_use = True


def dnp_swiglu(gate_up: torch.Tensor, gain: torch.Tensor, eps: float) -> torch.Tensor:
    """``silu(gain ⊙ RMSNorm(gate)) ⊙ RMSNorm(up)`` with ``[gate | up] = gate_up`` along the last dimension (one
    projection's output): norms over the branch width, fp32 inside, ``gate_up``'s dtype out. The CPU kernel once
    :func:`enable` has built it, else the PyTorch formulation."""
    if applies(gate_up):
        return torch.ops.scalevec.dnp_swiglu(gate_up, gain, eps)[0]
    return DNPSwiGLU.apply(gate_up, gain, eps)


class DNPSwiGLU(torch.autograd.Function):
    """``dnp_swiglu`` in PyTorch ops, saving only the projection output (autograd through ``rms_norm`` would also
    keep the normalised branches) and recomputing the rest in backward, differentiably (double backward works);
    its backward graph is shorter than autograd's, so what ``torch.compile`` fuses from it runs faster."""

    @staticmethod
    def forward(ctx, gate_up: torch.Tensor, gain: torch.Tensor, eps: float) -> torch.Tensor:
        ctx.save_for_backward(gate_up, gain)
        ctx.eps = eps
        return formula(gate_up, gain, eps)

    @staticmethod
    def backward(ctx, dh: torch.Tensor):
        gate_up, gain = ctx.saved_tensors
        return *dnp_swiglu_backward(dh, gate_up, gain, ctx.eps), None


def formula(gate_up: torch.Tensor, gain: torch.Tensor, eps: float) -> torch.Tensor:
    """The forward in PyTorch ops."""
    gate, up = gate_up.chunk(2, -1)
    return (F.silu(_rms(gate, eps) * gain) * _rms(up, eps)).to(gate_up.dtype)


def dnp_swiglu_backward(dh: torch.Tensor, gate_up: torch.Tensor, gain: torch.Tensor,
                        eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients at ``gate_up`` and ``gain`` from the output gradient ``dh``, in differentiable ops (the kernel's
    autograd uses it when a differentiable backward is asked for)."""
    dgate_up, per_token = gradients(dh, gate_up, gain, eps)
    return dgate_up, token_sum(per_token, gate_up.dtype).to(gain.dtype)


def gradients(dh: torch.Tensor, gate_up: torch.Tensor, gain: torch.Tensor,
              eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradient at ``gate_up`` and the gain's gradient per token, before its sum over tokens."""
    gate, up = gate_up.chunk(2, -1)
    xg, rg = _rms(gate, eps, with_rstd=True)
    xu, ru = _rms(up, eps, with_rstd=True)
    dh = dh.to(xg.dtype)
    a = xg * gain
    s = torch.sigmoid(a)
    silu = a * s
    dsilu = dh * xu
    da = dsilu * (s + silu * (1 - s))  # silu'(a) = s + a·s·(1 - s)
    # RMSNorm backward: dx = r (dx̂ - x̂ · mean(dx̂ ⊙ x̂)), with dx̂_gate ⊙ x̂_gate = da ⊙ a and
    # dx̂_up ⊙ x̂_up = dsilu ⊙ silu.
    dg = rg * (da * gain - xg * (da * a).mean(-1, keepdim=True))
    du = ru * (dh * silu - xu * (dsilu * silu).mean(-1, keepdim=True))
    return torch.cat([dg, du], -1).to(gate_up.dtype), da * xg


def token_sum(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Sum over every dimension but the last, in fp32. With low-precision inputs (bf16 autocast) it is a
    ones-vector matmul on ``t`` rounded to ``dtype``, the precision of every weight gradient under autocast, so
    that inductor need not keep ``t`` in fp32 for it."""
    t = t.flatten(0, -2)
    if dtype not in (torch.bfloat16, torch.float16):
        return t.sum(0)
    ones = torch.ones(1, t.shape[0], dtype=dtype, device=t.device)
    return (ones @ t.to(dtype)).squeeze(0).float()


def _rms(x: torch.Tensor, eps: float, with_rstd: bool = False):
    """x / RMS(x) over the last dimension in at least fp32 (and the per-row 1/RMS with ``with_rstd``)."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    r = torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
    return (xf * r, r) if with_rstd else xf * r


# ---- the CPU kernel -----------------------------------------------------------------------------------------


def enable(model: nn.Module) -> bool:
    """Builds and loads the kernel if ``model`` sits on CPU and runs the op (a module with ``uses_dnp_swiglu``
    set); True when it is in use. Called from outside the model, where its device is known, so a model on a GPU
    never builds it."""
    on_cpu = any(p.device.type == "cpu" for p in model.parameters())
    uses = any(getattr(m, "uses_dnp_swiglu", False) for m in model.modules())
    return on_cpu and uses and load()


def load() -> bool:
    """Builds (the first time on this machine) and loads the kernel; False, after one warning, where that fails
    or ``SCALEVEC_CPU_KERNELS=0``."""
    global _tried, _ready
    if _tried:
        return _ready
    _tried = True
    if os.environ.get(ENV, "1") == "0":
        return False
    try:
        _build()
    # What a failed build raises: RuntimeError (compiler or ninja errors, no ninja), OSError (no compiler, a
    # library that does not load), ImportError, subprocess errors; the compiler's output is long, its first line
    # names the problem.
    except (RuntimeError, OSError, ImportError, subprocess.SubprocessError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        warnings.warn(f"scalevec: CPU kernels not built ({reason}); DNP runs its PyTorch formulation "
                      f"(same results up to rounding, slower)", RuntimeWarning, stacklevel=2)
        return False
    _register()
    _ready = True
    return True


def applies(gate_up: torch.Tensor) -> bool:
    """Whether the kernel runs for this projection output."""
    return _ready and _use and gate_up.device.type == "cpu" and gate_up.dtype in DTYPES


@contextlib.contextmanager
def disabled():
    """Runs the PyTorch formulation inside the block (benchmarks and tests compare the two). Compiled code guards
    on the switch, so a function compiled inside recompiles when called outside, and vice versa."""
    global _use
    before, _use = _use, False
    try:
        yield
    finally:
        _use = before


def compile_flags() -> list[str]:
    """The compiler flags of the build: optimised, OpenMP, and the instruction set torch dispatches to here."""
    return ["-O3", "-fopenmp", *_ARCH_FLAGS.get(torch.backends.cpu.get_cpu_capability(), [])]


def _build() -> None:
    from torch.utils.cpp_extension import load as load_extension

    if shutil.which("ninja") is None:  # the pip package installs it beside the interpreter, maybe not on PATH
        with contextlib.suppress(ImportError):
            import ninja

            os.environ["PATH"] = f"{ninja.BIN_DIR}{os.pathsep}{os.environ.get('PATH', '')}"
    # One build per capability and torch version: a cache shared by different machines or an upgraded torch never
    # loads a library built for something else.
    name = re.sub(r"\W", "_", f"scalevec_cpu_{torch.backends.cpu.get_cpu_capability()}_{torch.__version__}").lower()
    load_extension(
        name=name,
        sources=[str(CSRC / "dnp_swiglu.cpp")],
        extra_cflags=compile_flags(),
        extra_ldflags=["-fopenmp"],
        is_python_module=False,
        verbose=False,
    )


def _register() -> None:
    """Shapes for tracing (``torch.compile``, meta tensors) and the autograd formula of the operators."""

    @torch.library.register_fake("scalevec::dnp_swiglu")
    def _(gate_up, gain, eps):
        h = gate_up.new_empty((*gate_up.shape[:-1], gate_up.shape[-1] // 2))
        return h, gate_up.new_empty((math.prod(gate_up.shape[:-1]), 2), dtype=torch.float32)

    @torch.library.register_fake("scalevec::dnp_swiglu_backward")
    def _(dh, gate_up, gain, rstd):
        return gate_up.new_empty(gate_up.shape), torch.empty_like(gain)

    def setup_context(ctx, inputs, output):
        gate_up, gain, eps = inputs
        ctx.save_for_backward(gate_up, gain, output[1])
        ctx.eps = eps
        ctx.mark_non_differentiable(output[1])

    def backward(ctx, dh, _drstd):
        gate_up, gain, rstd = ctx.saved_tensors
        if torch.is_grad_enabled():  # a differentiable backward is asked for (create_graph): the PyTorch formula
            dgu, dgain = dnp_swiglu_backward(dh, gate_up, gain, ctx.eps)
        else:
            dgu, dgain = torch.ops.scalevec.dnp_swiglu_backward(dh, gate_up, gain, rstd)
        return dgu, dgain, None

    torch.library.register_autograd("scalevec::dnp_swiglu", backward, setup_context=setup_context)
