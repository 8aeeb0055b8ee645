"""Claim 5 of docs/paper.md (Thm 3.2): OR/ER give the magnitude direction a d-fold effective learning rate
under gradient descent, and under AdamW a smaller factor between 1 and √d (``check_or_adamw``).

With γ = m · √d · α/‖α‖ and u = α/‖α‖, one GD step of size η on (m, α) moves γ by −η J Jᵀ ∇_γ L with

    J Jᵀ = d · u uᵀ + (m² d / ‖α‖²) (I − u uᵀ)                 (OR)
    J Jᵀ = m² d · u uᵀ + (m² d / ‖α‖²) (I − u uᵀ)   with m = e^b (ER)

so at init (m = 1, α = 1, ‖α‖² = d) the magnitude direction u gets d times the step of a plain γ and every
orthogonal direction the same step. The check measures −(u·Δγ)/(η u·∇L) on the library's ``ScaleVector``.
"""

from __future__ import annotations

import math
import time

import torch

from scalevec.scale import ScaleVector
from scalevec.theory.common import CheckResult, Figure, Line, Panel

DIMS = (16, 64, 256, 1024)
ETA = 1e-7  # float64: the O(η) curvature term is then far below the tolerance


def effective_lrs(sv: ScaleVector, grad: torch.Tensor, eta: float = ETA) -> tuple[float, float]:
    """(step of γ along u, step orthogonal to u), each per unit of η and of the gradient's component."""
    gamma = sv().detach().clone()  # a plain γ is the parameter itself: snapshot it
    u = gamma / gamma.norm()
    loss = (sv() * grad).sum()  # linear loss: ∇_γ L = grad exactly
    grads = torch.autograd.grad(loss, list(sv.parameters()))
    with torch.no_grad():
        for p, g in zip(sv.parameters(), grads):
            p.sub_(eta * g)
    delta = sv().detach() - gamma
    g_par, d_par = u @ grad, u @ delta
    g_orth, d_orth = grad - g_par * u, delta - d_par * u
    return float(-d_par / (eta * g_par)), float(d_orth.norm() / (eta * g_orth.norm()))


def predicted_lrs(sv: ScaleVector) -> tuple[float, float]:
    """The formulas above, read off the current parameters."""
    if sv.param == "plain":
        return 1.0, 1.0
    m = sv.magnitude.detach() if sv.param == "or" else sv.magnitude.detach().exp()
    m, a2 = float(m.squeeze()), float(sv.direction.detach().pow(2).sum())
    d = sv.dim
    return (d if sv.param == "or" else m * m * d), m * m * d / a2


@torch.no_grad()
def wander(sv: ScaleVector, seed: int) -> None:
    """Move the parameters to a generic non-init state (as training would), keeping them positive."""
    g = torch.Generator().manual_seed(seed)
    for p in sv.parameters():
        p.mul_(1 + 0.3 * torch.rand(p.shape, generator=g, dtype=p.dtype))
    if sv.param == "er":
        sv.magnitude.add_(0.4)  # a view of the packed parameter


def measure(param: str, d: int, seed: int, at_init: bool) -> dict[str, float]:
    sv = ScaleVector(d, param).double()
    if not at_init:
        wander(sv, seed)
    pred = predicted_lrs(sv)
    grad = torch.randn(d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    meas = effective_lrs(sv, grad)
    err = max(abs(a - b) / b for a, b in zip(meas, pred))
    return {"parallel": meas[0], "orthogonal": meas[1], "pred_parallel": pred[0], "rel_error": err}


def check_or_er(seed: int = 0) -> CheckResult:
    t0 = time.perf_counter()
    rows = {(p, d, init): measure(p, d, seed + d, init) for p in ("plain", "or", "er") for d in DIMS
            for init in (True, False)}
    worst = max(r["rel_error"] for r in rows.values())
    init_ratio = {p: [rows[(p, d, True)]["parallel"] / rows[("plain", d, True)]["parallel"] / d for d in DIMS]
                  for p in ("or", "er")}
    ratio_err = max(abs(x - 1) for v in init_ratio.values() for x in v)
    after_set = _orthogonal_after_set_value(DIMS[-1], seed)
    passed = worst <= 1e-4 and ratio_err <= 1e-4
    lines = [Line(f"{p} (measured, at init)", list(DIMS), [rows[(p, d, True)]["parallel"] for d in DIMS], True)
             for p in ("plain", "or", "er")]
    lines.append(Line("formula: d", list(DIMS), [float(d) for d in DIMS]))
    panel = Panel("effective learning rate along the magnitude direction (GD)", "d", "−Δγ·u / (η ∇L·u)",
                  lines, logx=True, logy=True)
    return CheckResult(
        name="or_er_magnitude_lr",
        claim="Under gradient descent, OR and ER multiply the learning rate along the magnitude direction "
              "of γ by d relative to a plain γ (at init; in general by the formula J Jᵀ above).",
        measured={
            "dims": list(DIMS),
            "parallel_lr_or_at_init": [rows[("or", d, True)]["parallel"] for d in DIMS],
            "max_rel_error_vs_formula": worst,
            "max_dev_of_or_er_over_plain_from_d": ratio_err,
            "parallel_lr_er_at_init": [rows[("er", d, True)]["parallel"] for d in DIMS],
            "orthogonal_lr_or_at_init": [rows[("or", d, True)]["orthogonal"] for d in DIMS],
            "parallel_lr_er_generic_state": [rows[("er", d, False)]["parallel"] for d in DIMS],
            f"orthogonal_lr_or_after_set_value_ones_d{DIMS[-1]}": after_set,
        },
        tolerance="relative error ≤ 1e-4 against the formula for every (param, d, init/generic state) "
                  f"with η = {ETA:g} in float64; OR/ER parallel LR over plain = d to 1e-4 at init",
        passed=passed,
        figures=[Figure("or_er_magnitude_lr.png", [panel])],
        note=(f"After `ScaleVector.set_value(ones)` (d = {DIMS[-1]}) the direction is stored with ‖α‖ = 1 "
              f"instead of √d, so the orthogonal effective LR becomes {after_set:.4g} instead of 1."),
        seconds=time.perf_counter() - t0,
    )


def _orthogonal_after_set_value(d: int, seed: int) -> float:
    """The orthogonal effective LR after ``set_value`` of the init value (same γ, re-stored parameters)."""
    sv = ScaleVector(d, "or").double()
    sv.set_value(torch.ones(d, dtype=torch.float64))
    grad = torch.randn(d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return effective_lrs(sv, grad)[1]


# ---- under AdamW ----------------------------------------------------------------------------------------------
#
# Adam normalises each coordinate's step, so the d-fold factor of gradient descent does not carry over. With a
# gradient whose every coordinate has mean μ and noise σ (r = σ/μ), Adam moves a plain γ along u = 1/√d by about
# lr·√d·μ/√(μ² + σ²) per step, and OR's scalar m, whose gradient √d·u·∇L has mean d·μ and noise √d·σ, by
# lr·√d·μ/√(d·μ² + σ²), which moves γ along u √d times as far. The ratio OR / plain is therefore
#
#     √d · √(1 + r²) / √(d + r²):   1 when every coordinate agrees (r → 0), √d when noise dominates (r → ∞).

ADAM_SNRS = (10.0, 1.0, 0.3, 0.1)  # μ/σ of the gradient's common component


def adam_parallel_step(param: str, d: int, snr: float, seed: int, steps: int, lr: float = 1e-3,
                       replicas: int = 256) -> float:
    """Mean step of γ along u per AdamW step, in units of lr, over independent replicas (rows of one gain)."""
    sv = ScaleVector(d, param, lead=(replicas,)).double()
    opt = torch.optim.AdamW(sv.parameters(), lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    start = sv().detach().clone()
    for _ in range(steps):
        g = snr + torch.randn(replicas, d, generator=gen, dtype=torch.float64)  # σ = 1
        opt.zero_grad()
        (sv() * g).sum().backward()
        opt.step()
    along_u = -(sv().detach() - start).sum(-1) / math.sqrt(d)
    return float(along_u.mean() / (steps * lr))


def adam_predicted_ratio(d: int, snr: float) -> float:
    r2 = 1.0 / snr**2
    return math.sqrt(d) * math.sqrt(1 + r2) / math.sqrt(d + r2)


def check_or_adamw(seed: int = 0, steps: int = 300, dims: tuple[int, ...] = DIMS) -> CheckResult:
    t0 = time.perf_counter()
    ratio = {(d, s): adam_parallel_step("or", d, s, seed, steps) / adam_parallel_step("plain", d, s, seed, steps)
             for d in dims for s in ADAM_SNRS}
    pred = {k: adam_predicted_ratio(*k) for k in ratio}
    rel = {k: abs(ratio[k] / pred[k] - 1) for k in ratio}
    worst = max(rel.values())
    lines = [Line(f"μ/σ = {s:g}", list(dims), [ratio[(d, s)] for d in dims], True) for s in ADAM_SNRS]
    lines += [Line("formula, μ/σ = 0.1", list(dims), [pred[(d, 0.1)] for d in dims]),
              Line("√d", list(dims), [math.sqrt(d) for d in dims]), Line("d (gradient descent)", list(dims),
                                                                        [float(d) for d in dims])]
    panel = Panel("OR / plain step of γ along its magnitude direction (AdamW)", "d", "ratio of steps along u",
                  lines, logx=True, logy=True)
    return CheckResult(
        name="or_magnitude_step_adamw",
        claim="Under AdamW, OR does not give the magnitude direction a d-fold learning rate: its step along u "
              "over a plain γ's is √d·√(1 + r²)/√(d + r²) for a gradient with noise-to-signal r per coordinate, "
              "between 1 (coherent gradient) and √d (noisy gradient).",
        measured={
            **{f"ratio_or_over_plain_snr_{s:g}": [ratio[(d, s)] for d in dims] for s in ADAM_SNRS[::-1]},
            "max_rel_error_vs_formula": worst,
            **{f"predicted_snr_{s:g}": [pred[(d, s)] for d in dims] for s in ADAM_SNRS[::-1]},
            "dims": list(dims), "steps": steps, "lr": 1e-3, "replicas": 256,
        },
        tolerance="measured ratio within 5% of the formula at every (d, μ/σ); AdamW with default betas, "
                  "lr 1e-3, no weight decay, 256 independent replicas, from init",
        passed=worst <= 0.05,
        figures=[Figure("or_magnitude_step_adamw.png", [panel])],
        note="The formula treats Adam's step as lr·E[g]/√E[g²] per coordinate (its stationary value); the "
             "direction α moves too, which the measurement includes.",
        seconds=time.perf_counter() - t0,
    )
