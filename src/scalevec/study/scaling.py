"""Compute scaling fits ``L(C) = E + A·C^−α`` and the compute multiplier at equal loss.

FLOP convention: ``C = 6·N·D`` with N the non-embedding parameters (active ones for MoE) and D the training
tokens; it omits attention FLOPs and the embedding/LM head, like Kaplan et al. and the paper's ladder counts.

The multiplier of strategy u over baseline b at loss L is ``C_b(L) / C_u(L)``: how much more compute the
baseline needs to reach the loss u reaches. It is reported two ways: from the fitted curves (needs more points
than the fit's 3 parameters to mean anything) and model-free, by interpolating the baseline's measured
(log C, L) points at u's measured losses (only inside the baseline's measured range).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass

import numpy as np
from scipy.optimize import curve_fit


@dataclass
class Fit:
    E: float
    A: float
    alpha: float
    n: int
    rmse: float
    ok: bool  # the fit has more points than parameters and finite parameter uncertainties
    note: str

    def loss(self, c: np.ndarray | float) -> np.ndarray | float:
        return self.E + self.A * np.power(c, -self.alpha)

    def compute_at(self, loss: float) -> float:
        """C at which the fitted curve reaches ``loss`` (NaN below the irreducible E)."""
        if not (loss > self.E) or not math.isfinite(self.alpha) or self.alpha <= 0:
            return math.nan
        return float((self.A / (loss - self.E)) ** (1.0 / self.alpha))

    def as_dict(self) -> dict:
        return {
            k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in asdict(self).items()
        }


NAN_FIT = Fit(math.nan, math.nan, math.nan, 0, math.nan, False, "no points")


def fit_power_law(compute: list[float] | np.ndarray, loss: list[float] | np.ndarray) -> Fit:
    """Least squares in L over (E, A, α), with C normalised by its geometric mean for conditioning."""
    c = np.asarray(compute, dtype=float)
    y = np.asarray(loss, dtype=float)
    keep = np.isfinite(c) & np.isfinite(y) & (c > 0)
    c, y = c[keep], y[keep]
    n = len(c)
    if n < 3:
        return Fit(
            math.nan, math.nan, math.nan, n, math.nan, False, f"{n} point(s): a 3-parameter fit needs >= 3"
        )
    c0 = float(np.exp(np.log(c).mean()))
    x = c / c0

    def f(x, e, a, alpha):
        return e + a * np.power(x, -alpha)

    lo = float(y.min())
    p0 = (max(0.0, lo - 0.5 * (y.max() - lo) - 1e-3), max(y.max() - lo, 1e-3), 0.3)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            popt, pcov = curve_fit(
                f, x, y, p0=p0, bounds=([0.0, 1e-12, 1e-4], [lo, np.inf, 3.0]), maxfev=20000
            )
    except (RuntimeError, ValueError) as e:
        return Fit(math.nan, math.nan, math.nan, n, math.nan, False, f"fit failed: {e}")
    e, a0, alpha = (float(v) for v in popt)
    rmse = float(np.sqrt(np.mean((f(x, *popt) - y) ** 2)))
    a = a0 * c0**alpha  # back to L = E + A·C^-α in raw compute units
    finite_cov = bool(np.all(np.isfinite(np.diag(pcov))))
    if n <= 3:
        note = (
            f"{n} points for 3 parameters: the curve interpolates, its extrapolation and multiplier are "
            "not reliable"
        )
    elif not finite_cov:
        note = "ill-conditioned: parameter uncertainties are infinite"
    elif alpha >= 2.999 or e <= 1e-9:
        note = "a parameter sits at its bound: treat the fit as ill-conditioned"
    else:
        note = "ok"
    return Fit(e, a, alpha, n, rmse, note == "ok", note)


def fitted_multiplier(base: Fit, other: Fit, loss: float) -> float:
    """C_base(L) / C_other(L) from the two fitted curves (NaN where either cannot reach L)."""
    cb, co = base.compute_at(loss), other.compute_at(loss)
    return cb / co if math.isfinite(cb) and math.isfinite(co) and co > 0 else math.nan


def interpolated_multipliers(base_c, base_l, other_c, other_l) -> list[tuple[float, float]]:
    """Model-free: for each of ``other``'s points inside the baseline's loss range, the baseline compute at
    that loss by interpolating log C linearly in L between the baseline's points.

    Returns (C_other, multiplier) pairs."""
    bc, bl = np.asarray(base_c, dtype=float), np.asarray(base_l, dtype=float)
    order = np.argsort(bl)
    bl, logc = bl[order], np.log(bc[order])
    out = []
    for c, loss in zip(other_c, other_l):
        if len(bl) >= 2 and bl[0] <= loss <= bl[-1] and math.isfinite(loss):
            out.append((float(c), float(np.exp(np.interp(loss, bl, logc)) / c)))
    return out
