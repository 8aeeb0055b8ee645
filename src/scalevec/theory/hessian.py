"""Top Hessian eigenvalue by power iteration on Hessian-vector products (never forming the Hessian)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import contextmanager

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel


def _dot(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> torch.Tensor:
    return sum((x * y).sum() for x, y in zip(a, b))


def _normalise(v: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    n = _dot(v, v).sqrt()
    return [x / n for x in v]


def top_hessian_eigenvalue(
    loss_fn: Callable[[], torch.Tensor],
    params: Sequence[torch.Tensor],
    iters: int = 100,
    rtol: float = 1e-4,
    seed: int = 0,
) -> tuple[float, list[float]]:
    """The eigenvalue of largest magnitude of ∇²L and its Rayleigh-quotient history.

    The gradient graph is built once (``create_graph``) and reused for every HVP. Stops when two successive
    estimates agree to ``rtol``; the history lets a caller judge convergence.
    """
    g = torch.Generator().manual_seed(seed)
    v = _normalise([torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params])
    grads = torch.autograd.grad(loss_fn(), params, create_graph=True)
    history: list[float] = []
    for _ in range(iters):
        hv = torch.autograd.grad(grads, params, v, retain_graph=True)
        history.append(float(_dot(hv, v)))
        v = _normalise([h.detach() for h in hv])
        if len(history) > 1 and abs(history[-1] - history[-2]) <= rtol * abs(history[-1]):
            break
    return history[-1], history


@contextmanager
def double_backward_attention():
    """PyTorch's fused CPU attention kernels have no double backward; the math kernel does (needed for HVPs)."""
    with sdpa_kernel(SDPBackend.MATH):
        yield
