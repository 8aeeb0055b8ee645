"""``torch.compile`` as the training step uses it: inductor, with two settings that apply to the models compiled
here only (the trainer's and the benchmarks'), not process-wide:

- The partitioner may recompute reductions in the backward instead of saving their outputs: the scale vectors'
  small computations (OR's normalisers, a norm's inverse RMS) are reductions, and each saved one is one more
  input of the compiled backward. (Allowing ops outside the partitioner's allowlist as well would recompute the
  MoE experts' grouped matmul for some strategies only: a trade of compute for memory that differs per model.)
- inductor's generated wrapper re-checks each input's size and stride on every call (``size_asserts``). Dynamo's
  guards check every graph input before the compiled forward runs, and the backward receives the tensors the
  compiled forward saved (AOTAutograd coerces incoming gradients to the traced strides), so the per-tensor checks
  only repeat what is known.

The measurements behind both: ``docs/performance.md``.
"""

from __future__ import annotations

import os
import shutil
import sysconfig
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch._functorch.config as functorch_config
from torch import nn

from scalevec.typed_config import ConfigError

# min_cut_rematerialization_partition reads these while AOTAutograd partitions the joint graph, which happens
# inside the backend call below, so patching around that call scopes them to these models.
PARTITIONER = {"ban_recompute_reductions": False}
INDUCTOR = {"size_asserts": False}


def inductor_backend(gm: torch.fx.GraphModule, example_inputs: Sequence[object]) -> Callable:
    """inductor with ``PARTITIONER`` and ``INDUCTOR`` in force while this graph compiles."""
    from torch._inductor.compile_fx import compile_fx

    with functorch_config.patch(PARTITIONER):
        return compile_fx(gm, example_inputs, config_patches=INDUCTOR)


def compile_model(model: nn.Module) -> nn.Module:
    """``model`` compiled for training (calls go to the compiled forward; parameters stay ``model``'s)."""
    return torch.compile(model, backend=inductor_backend)


# Runs at least this long compile under train.compile="auto": shorter ones spend more time compiling than the
# compiled steps save (docs/performance.md).
COMPILE_AUTO_MIN_STEPS = 500


def use_compile(setting: bool | str, steps: int, device: torch.device) -> bool:
    """Resolve ``train.compile``: "auto" compiles long runs, and only where a backend can build kernels (a C++
    compiler and Python's headers for inductor's CPU code; CUDA builds ship Triton). ``true`` where CPU kernels
    cannot be built is refused with one line instead of failing inside the first step."""
    if setting != "auto":
        if setting and device.type == "cpu" and not cpu_compiler_available():
            raise ConfigError("train.compile=true: torch.compile on CPU needs a C++ compiler (g++, clang++ or $CXX) "
                              "and Python's headers (Python.h), and this machine lacks one; install them or set "
                              "train.compile=false")
        return bool(setting)
    if steps < COMPILE_AUTO_MIN_STEPS:
        return False
    return device.type == "cuda" or cpu_compiler_available()


def cpu_compiler_available() -> bool:
    """Inductor builds each CPU kernel as a Python extension module: it needs a C++ compiler and Python.h."""
    compiler = any(shutil.which(c) for c in (os.environ.get("CXX", ""), "g++", "c++", "clang++") if c)
    return compiler and Path(sysconfig.get_paths()["include"], "Python.h").is_file()
