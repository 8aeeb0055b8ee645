"""The micro-benchmarks behind the hot-path choices in ``scalevec/layers.py`` (compiled fwd+bwd, CPU, one process,
interleaved rounds; times are medians, ratios medians of per-round ratios).

    python benchmarks/decisions/kernels.py                 # tiny and 0.12B shapes

1. attention: ``F.scaled_dot_product_attention`` (causal, CPU flash kernel) on bf16 vs fp32 q/k/v laid out as the
   model lays them out (a (B, T, 3, H, hd) projection, transposed) -> why attention runs in fp32 on CPU.
2. DNP SwiGLU elementwise part: plain SwiGLU ``silu(g) * u`` (the baseline), autograd through ``F.rms_norm`` with
   γ_up applied to activations, autograd with γ_up moved into W_down, ``dnp_swiglu`` in its PyTorch formulation
   (what inductor fuses) and as the ``scalevec::dnp_swiglu`` CPU kernel -> why the hand-derived function, why the
   kernel and why γ_up sits on W_down.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from dataclasses import dataclass

import torch
import torch._dynamo
import torch.nn.functional as F

from scalevec.ops import dnp_swiglu as kernel_ops
from scalevec.ops.dnp_swiglu import dnp_swiglu

EPS = 1e-6


def timed(cands: dict, rounds: int, reps: int = 3) -> dict[str, list[float]]:
    for f in cands.values():
        f()
        f()
    out: dict[str, list[float]] = {k: [] for k in cands}
    names = list(cands)
    for r in range(rounds):
        for k in names if r % 2 == 0 else names[::-1]:
            t0 = time.perf_counter()
            for _ in range(reps):
                cands[k]()
            out[k].append((time.perf_counter() - t0) / reps)
    return out


def report(title: str, times: dict[str, list[float]], ref: str) -> dict:
    print(title)
    rows = {}
    for k, v in times.items():
        rel = statistics.median(a / b for a, b in zip(v, times[ref]))
        rows[k] = {"ms": 1e3 * statistics.median(v), "vs_" + ref: rel}
        print(f"  {k:<34} {rows[k]['ms']:8.2f} ms  {rel:5.2f}x {ref}")
    return rows


def attention(B: int, T: int, H: int, hd: int, rounds: int) -> dict:
    def make(dtype: torch.dtype):
        proj = torch.randn(B, T, 3 * H * hd, dtype=torch.bfloat16, requires_grad=True)

        def f(x):
            q, k, v = (t.view(B, T, H, hd).transpose(1, 2).to(dtype) for t in x.split(H * hd, -1))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return y.transpose(1, 2).reshape(B, T, H * hd).to(torch.bfloat16)

        g = torch.compile(f)
        return lambda: g(proj).backward(torch.ones(B, T, H * hd, dtype=torch.bfloat16))

    times = timed({"sdpa bf16": make(torch.bfloat16), "sdpa fp32 (casts included)": make(torch.float32)}, rounds)
    return report(f"attention fwd+bwd, B={B} T={T} H={H} hd={hd}", times, "sdpa bf16")


@dataclass
class MLPCase:
    """Inputs of the MLP-middle benchmarks: the [gate | up] projection output (bf16), the gradient arriving at
    W_down's output, W_down and the two DNP gains."""

    gu: torch.Tensor
    dh: torch.Tensor
    w_down: torch.Tensor
    g_gate: torch.Tensor
    g_up: torch.Tensor

    @classmethod
    def make(cls, tokens: int, d: int, d_ff: int) -> MLPCase:
        g = torch.Generator().manual_seed(0)
        return cls(
            gu=torch.randn(tokens, 2 * d_ff, generator=g).bfloat16(),
            dh=torch.randn(tokens, d, generator=g).bfloat16(),
            w_down=(0.02 * torch.randn(d, d_ff, generator=g)).requires_grad_(),
            g_gate=(1 + 0.1 * torch.randn(d_ff, generator=g)).requires_grad_(),
            g_up=(1 + 0.1 * torch.randn(d_ff, generator=g)).requires_grad_(),
        )

    def plain(self, gu: torch.Tensor) -> torch.Tensor:
        """The baseline: plain SwiGLU and W_down."""
        a, b = gu.chunk(2, -1)
        return F.linear(F.silu(a) * b, self.w_down.bfloat16())

    def step(self, fn, kernel: bool = False) -> callable:
        """Compiled forward of ``fn(gate_up)`` plus its backward, as one benchmark candidate; with ``kernel``
        False scalevec's CPU kernels are off (their PyTorch formulations run)."""
        x = self.gu.clone().requires_grad_()
        c = torch.compile(fn)

        def run():
            with contextlib.nullcontext() if kernel else kernel_ops.disabled():
                c(x).backward(self.dh)
        return run


def dnp(tokens: int, d: int, d_ff: int, rounds: int) -> dict:
    case = MLPCase.make(tokens, d, d_ff)
    d_ff, g_gate, g_up, w_down = case.g_gate.numel(), case.g_gate, case.g_up, case.w_down

    def autograd_act(gu):  # γ_up on the activations, both norms through autograd
        a, b = gu.chunk(2, -1)
        h = F.silu(F.rms_norm(a, (d_ff,), g_gate.bfloat16(), EPS)) * F.rms_norm(b, (d_ff,), g_up.bfloat16(), EPS)
        return F.linear(h, w_down.bfloat16())

    def autograd_w(gu):  # γ_up multiplied into W_down's columns
        a, b = gu.chunk(2, -1)
        h = F.silu(F.rms_norm(a, (d_ff,), g_gate.bfloat16(), EPS)) * F.rms_norm(b, (d_ff,), None, EPS)
        return F.linear(h, (w_down * g_up).bfloat16())

    def fused(gu):  # what scalevec runs
        return F.linear(dnp_swiglu(gu, g_gate, EPS), (w_down * g_up).bfloat16())

    cands = {"plain SwiGLU (baseline)": case.step(case.plain),
             "DNP autograd, γ_up on activations": case.step(autograd_act),
             "DNP autograd, γ_up in W_down": case.step(autograd_w),
             "DNP dnp_swiglu PyTorch, γ_up in W_down": case.step(fused)}
    if kernel_ops.load():
        cands["DNP dnp_swiglu kernel, γ_up in W_down"] = case.step(fused, kernel=True)
    times = timed(cands, rounds)
    return report(f"MLP middle + W_down fwd+bwd, tokens={tokens} d={d} d_ff={d_ff}", times,
                  "plain SwiGLU (baseline)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch._dynamo.config.recompile_limit = 64
    print(f"threads={torch.get_num_threads()} torch={torch.__version__}")
    attention(16, 128, 4, 32, args.rounds)  # tiny: batch 16 x 128, 4 heads of 32
    attention(4, 256, 12, 64, args.rounds)  # the 0.12B shape at batch 4 x 256
    dnp(2048, 128, 512, args.rounds)  # tiny
    dnp(1024, 768, 3328, args.rounds)  # 0.12B


if __name__ == "__main__":
    main()
