"""Model FLOPs utilisation: training FLOPs per token against a matmul peak measured on this device."""

from __future__ import annotations

import functools
import time

import torch

from scalevec.models.config import ModelConfig


def flops_breakdown(mc: ModelConfig, seq_len: int) -> dict[str, float]:
    """Training FLOPs per token (3x the forward's), counted per matmul: ``dense``, every weight matmul a token
    passes through (the routed top-k and shared experts and the router for MoE, the LM head); ``attention``,
    QKᵀ and AV at the PaLM convention, 12·L·d·T; ``total``. Norms, softmax and elementwise ops are not counted."""
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
    attention = 12.0 * layers * d * seq_len
    return {"dense": 3.0 * forward, "attention": attention, "total": 3.0 * forward + attention}


def flops_per_token(mc: ModelConfig, seq_len: int) -> float:
    return flops_breakdown(mc, seq_len)["total"]


def measure_matmul_peak(device: str, dtype: torch.dtype, n: int, reps: int) -> float:
    """FLOP/s of the best of ``reps`` n×n×n matmuls in ``dtype`` on ``device``."""
    dev = torch.device(device)
    a = torch.randn(n, n, device=dev).to(dtype)
    b = torch.randn(n, n, device=dev).to(dtype)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    for _ in range(2):
        a @ b
    sync()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


@functools.cache
def matmul_peak(device: str, dtype: torch.dtype) -> float:
    """The device's peak, once per process: a fraction of a second, sized so a CPU finishes quickly and a GPU
    is kept busy."""
    return measure_matmul_peak(device, dtype, 8192 if torch.device(device).type == "cuda" else 1024, 5)
