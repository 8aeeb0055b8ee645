"""Why DNP's SwiGLU backward sums γ_gate's gradient as a bf16 matmul: variants of that reduction over tokens,
measured like ``kernels.py`` (MLP middle + W_down, compiled fwd+bwd, bf16
inputs, one process, interleaved rounds; medians, ratios to plain SwiGLU).

    python benchmarks/dnp_gain_reduction.py            # tiny (d_ff 512) and small (d_ff 1024) shapes

Variants of ``dgain = sum_tokens(da * x̂_gate)`` in ``layers._DNPSwiGLU.backward``:
  fp32-sum  the plain column sum in fp32 (scalevec before; inductor keeps the fp32 product for it)
  bf16-da   da rounded to the inputs' dtype first (halves what is materialised)
  blocked   16 partial sums over token blocks, then their sum
  mm        a ones-vector matmul over the fp32 product
  mm-bf16   the same on the product rounded to bf16: what scalevec runs under autocast (``layers._token_sum``)
  no-dgain  γ_gate gets no gradient: a floor, the cost of the two norms alone (not a usable variant)
"""

from __future__ import annotations

import argparse

import torch
import torch._dynamo
import torch.nn.functional as F
from kernels import EPS, report, timed

from scalevec.layers import _rms


def gain_grad(variant: str, da: torch.Tensor, xg: torch.Tensor, dtype: torch.dtype):
    """(dgain, da to use downstream) for one variant."""
    if variant == "bf16-da":
        da = da.to(dtype).float()
        return (da * xg).flatten(0, -2).sum(0), da
    t = (da * xg).flatten(0, -2)
    if variant == "blocked":
        return t.view(16, -1, t.shape[-1]).sum(1).sum(0), da
    if variant in ("mm", "mm-bf16"):
        t = t.to(dtype) if variant == "mm-bf16" else t
        return (torch.ones(1, t.shape[0], dtype=t.dtype) @ t).squeeze(0).float(), da
    if variant == "no-dgain":
        return None, da
    return t.sum(0), da


def dnp_variant(variant: str):
    class DNPSwiGLU(torch.autograd.Function):
        @staticmethod
        def forward(ctx, gate, up, gain, eps):
            ctx.save_for_backward(gate, up, gain)
            ctx.eps = eps
            return (F.silu(_rms(gate, eps) * gain) * _rms(up, eps)).to(gate.dtype)

        @staticmethod
        def backward(ctx, dh):
            gate, up, gain = ctx.saved_tensors
            xg, rg = _rms(gate, ctx.eps, with_rstd=True)
            xu, ru = _rms(up, ctx.eps, with_rstd=True)
            dh = dh.to(xg.dtype)
            a = xg * gain
            s = torch.sigmoid(a)
            silu = a * s
            dsilu = dh * xu
            da = dsilu * (s + silu * (1 - s))
            dgain, da = gain_grad(variant, da, xg, gate.dtype)
            dg = rg * (da * gain - xg * (da * a).mean(-1, keepdim=True))
            du = ru * (dh * silu - xu * (dsilu * silu).mean(-1, keepdim=True))
            return dg.to(gate.dtype), du.to(up.dtype), dgain, None

    return DNPSwiGLU.apply


VARIANTS = ("fp32-sum", "bf16-da", "blocked", "mm", "mm-bf16", "no-dgain")


def run(tokens: int, d: int, d_ff: int, rounds: int) -> dict:
    g = torch.Generator().manual_seed(0)
    gu = torch.randn(tokens, 2 * d_ff, generator=g).bfloat16()
    dh = torch.randn(tokens, d, generator=g).bfloat16()
    w_down = (0.02 * torch.randn(d, d_ff, generator=g)).requires_grad_()
    g_gate = (1 + 0.1 * torch.randn(d_ff, generator=g)).requires_grad_()
    g_up = (1 + 0.1 * torch.randn(d_ff, generator=g)).requires_grad_()

    def plain(a, b):
        return F.linear(F.silu(a) * b, w_down.bfloat16())

    def with_variant(v):
        fn = dnp_variant(v)
        return lambda a, b: F.linear(fn(a, b, g_gate, EPS), (w_down * g_up).bfloat16())

    def make(fn):
        x = gu.clone().requires_grad_()
        c = torch.compile(lambda t: fn(*t.chunk(2, -1)))
        return lambda: c(x).backward(dh)

    fns = {"plain SwiGLU (baseline)": plain, **{f"DNP {v}": with_variant(v) for v in VARIANTS}}
    times = timed({k: make(f) for k, f in fns.items()}, rounds)
    return report(f"MLP middle + W_down fwd+bwd, tokens={tokens} d={d} d_ff={d_ff}", times,
                  "plain SwiGLU (baseline)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=21)
    args = p.parse_args()
    torch._dynamo.config.recompile_limit = 64
    print(f"threads={torch.get_num_threads()} torch={torch.__version__}")
    run(2048, 128, 512, args.rounds)  # tiny
    run(2048, 256, 1024, args.rounds)  # small


if __name__ == "__main__":
    main()
