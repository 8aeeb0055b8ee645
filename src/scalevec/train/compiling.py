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

from collections.abc import Callable, Sequence

import torch
import torch._functorch.config as functorch_config
from torch import nn

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
