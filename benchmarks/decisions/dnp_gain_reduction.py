"""Why DNP's SwiGLU backward sums γ_gate's gradient as a bf16 matmul: ways to reduce ``t = da ⊙ x̂_gate`` over
tokens, plugged into the backward of ``dnp_swiglu``'s PyTorch formulation and measured like ``kernels.py`` (MLP
middle + W_down, compiled fwd+bwd, bf16 inputs, one process, interleaved rounds; medians, ratios to plain
SwiGLU). This is the path a DNP model takes where the ``scalevec::dnp_swiglu`` CPU kernel is not built (the
kernel sums γ_gate's gradient in fp32 per row block itself).

    python benchmarks/decisions/dnp_gain_reduction.py            # tiny (d_ff 512) and small (d_ff 1024) shapes

  fp32-sum   the plain column sum in fp32 (scalevec before; inductor keeps the fp32 product for it)
  bf16-sum   the column sum of t rounded to bf16 (halves what is materialised)
  blocked    16 partial sums over token blocks, then their sum
  mm         a ones-vector matmul over the fp32 product
  mm-bf16    the same on the product rounded to bf16: what scalevec runs under autocast (``ops.dnp_swiglu.token_sum``)
  no-dgain   γ_gate gets no gradient: a floor, the cost of the two norms alone (not a usable variant)
"""

from __future__ import annotations

import argparse

import torch
import torch._dynamo
import torch.nn.functional as F
from kernels import EPS, MLPCase, report, timed

from scalevec.ops.dnp_swiglu import formula, gradients, token_sum


def _ones_matmul(t: torch.Tensor) -> torch.Tensor:
    return (torch.ones(1, t.shape[0], dtype=t.dtype) @ t).squeeze(0).float()


VARIANTS = {
    "fp32-sum": lambda t, dtype: t.flatten(0, -2).sum(0),
    "bf16-sum": lambda t, dtype: t.flatten(0, -2).to(dtype).sum(0, dtype=torch.float32),
    "blocked": lambda t, dtype: t.flatten(0, -2).view(16, -1, t.shape[-1]).sum(1).sum(0),
    "mm": lambda t, dtype: _ones_matmul(t.flatten(0, -2)),
    "mm-bf16": token_sum,
    "no-dgain": lambda t, dtype: None,
}


class _WithSum(torch.autograd.Function):
    """``ops.dnp_swiglu.DNPSwiGLU`` with the reduction of γ's per-token gradient passed in."""

    @staticmethod
    def forward(ctx, gate_up, gain, reduce):
        ctx.save_for_backward(gate_up, gain)
        ctx.reduce = reduce
        return formula(gate_up, gain, EPS)

    @staticmethod
    def backward(ctx, dh):
        gate_up, gain = ctx.saved_tensors
        dgate_up, per_token = gradients(dh, gate_up, gain, EPS)
        dgain = ctx.reduce(per_token, gate_up.dtype)
        return dgate_up, None if dgain is None else dgain.to(gain.dtype), None


def run(tokens: int, d: int, d_ff: int, rounds: int) -> dict:
    case = MLPCase.make(tokens, d, d_ff)

    def with_sum(reduce):  # what MLP.forward runs for DNP, with this reduction in the backward
        return lambda gu: F.linear(_WithSum.apply(gu, case.g_gate, reduce), (case.w_down * case.g_up).bfloat16())

    fns = {"plain SwiGLU (baseline)": case.plain, **{f"DNP {k}": with_sum(v) for k, v in VARIANTS.items()}}
    times = timed({k: case.step(f) for k, f in fns.items()}, rounds)
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
