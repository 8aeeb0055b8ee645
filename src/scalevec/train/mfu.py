"""Model FLOPs utilisation: training FLOPs per token against a matmul peak measured on this device."""

from __future__ import annotations

import functools
import time

import torch

from scalevec.models.config import ModelConfig


def flops_per_token(mc: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 3x the forward's weight matmuls (the routed top-k experts only) plus QKᵀ and
    AV at the PaLM convention, 12·L·d·T. Norms, softmax and elementwise ops are not counted."""
    d, layers, hd = mc.d_model, mc.n_layers, mc.head_dim
    attention_proj = 2 * d * hd * (2 * mc.n_heads + 2 * mc.kv_heads)
    moe = mc.moe
    dense_layers = min(layers, moe.first_dense) if moe.num_experts else layers
    mlp = 2 * 3 * d * mc.d_ff
    expert_mlp = 0
    if moe.num_experts:
        width = moe.d_expert or mc.d_ff
        expert_mlp = 2 * 3 * d * width * (moe.top_k + moe.num_shared) + 2 * d * moe.num_experts
    forward = (layers * attention_proj + dense_layers * mlp + (layers - dense_layers) * expert_mlp
               + 2 * d * mc.vocab_size)
    return 3.0 * forward + 12.0 * layers * d * seq_len


@functools.cache
def matmul_peak(device: str, dtype: torch.dtype) -> float:
    """FLOP/s of the best of a few square matmuls in ``dtype``: once per process and device, a fraction of a
    second, sized so a CPU finishes quickly and a GPU is kept busy."""
    dev = torch.device(device)
    n = 8192 if dev.type == "cuda" else 1024
    a = torch.randn(n, n, device=dev).to(dtype)
    b = torch.randn(n, n, device=dev).to(dtype)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    a @ b
    sync()
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best
