"""Hand-written CPU kernels (``csrc/``), built by torch's C++ extension loader when :func:`enable` first meets a
model on CPU that runs one; model constructors never build them (on a GPU they would only cost time).

One so far: ``scalevec::dnp_swiglu``, the SwiGLU of DNP branches, ``silu(γ ⊙ RMSNorm(gate)) ⊙ RMSNorm(up)``.
Its two branch norms make it a row-wise op, and the code ``torch.compile`` generates for it reads each row once
per row statistic; on CPU these elementwise kernels are bound by memory traffic, so DNP cost 1.2x (forward) and
1.4x (backward) plain SwiGLU's kernels. The kernel reads each row once per direction, as plain SwiGLU does
(``docs/performance.md`` has the measurements).

The build needs a C++ compiler and ninja (a dependency); it runs once per machine, CPU capability and torch
version (about 15 s, cached in torch's extension directory, ``TORCH_EXTENSIONS_DIR``). Where it cannot be built,
or with ``SCALEVEC_CPU_KERNELS=0``, :func:`scalevec.layers.dnp_swiglu` runs its PyTorch formulation instead: the
same function, equal up to floating-point rounding (the kernel's sigmoid uses a polynomial exp with at most 20
ulp error; it sums γ's gradient in fp32).
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


def load() -> bool:
    """Builds (the first time on this machine) and loads the kernels; False, after one warning, where that fails
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


def enable(model: torch.nn.Module) -> bool:
    """Builds and loads the kernels if ``model`` sits on CPU and runs one of them (a DNP SwiGLU); True when they
    are in use. Called from outside the model, where its device is known (the trainer, the benchmarks, loading
    a run), so a model on a GPU never builds them."""
    from scalevec.layers import MLP
    from scalevec.models.moe import MoE

    on_cpu = any(p.device.type == "cpu" for p in model.parameters())
    uses = any(isinstance(m, MLP) and m.dnp or isinstance(m, MoE) and m.dnp_shared for m in model.modules())
    return on_cpu and uses and load()


def dnp_swiglu_applies(gate_up: torch.Tensor) -> bool:
    """Whether ``scalevec::dnp_swiglu`` runs for this projection output."""
    return _ready and _use and gate_up.device.type == "cpu" and gate_up.dtype in DTYPES


@contextlib.contextmanager
def disabled():
    """Runs the PyTorch formulations inside the block (benchmarks and tests compare the two). Compiled code
    guards on the switch, so a function compiled inside recompiles when called outside, and vice versa."""
    global _use
    before, _use = _use, False
    try:
        yield
    finally:
        _use = before


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


def compile_flags() -> list[str]:
    """The compiler flags of the build: optimised, OpenMP, and the instruction set torch dispatches to here."""
    return ["-O3", "-fopenmp", *_ARCH_FLAGS.get(torch.backends.cpu.get_cpu_capability(), [])]


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
            from scalevec.layers import dnp_swiglu_backward

            dgu, dgain = dnp_swiglu_backward(dh, gate_up, gain, ctx.eps)
        else:
            dgu, dgain = torch.ops.scalevec.dnp_swiglu_backward(dh, gate_up, gain, rstd)
        return dgu, dgain, None

    torch.library.register_autograd("scalevec::dnp_swiglu", backward, setup_context=setup_context)
