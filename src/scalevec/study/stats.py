"""Paired statistics across seeds: what a study can and cannot resolve.

Arms that share a seed share the init and the data order, so the seed-to-seed noise largely cancels in the
per-seed difference ``d_i = L_arm,i − L_ref,i``. The test is a paired t-test on ``d``; the smallest effect the
seeds could detect is reported two ways: ``min_sig`` = t_{0.975,n−1}·sd(d)/√n (the smallest mean difference
that would reach p < 0.05, the half-width of the 95% interval) and ``mde80`` = (t_{0.975,n−1} + t_{0.8,n−1})·
sd(d)/√n (the true effect detected with 80% power).
"""

from __future__ import annotations

import math
from collections.abc import Hashable
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats as sps


@dataclass
class Paired:
    n: int
    mean: float  # mean of arm − ref
    sd: float  # standard deviation of the per-seed differences (ddof=1)
    t: float
    p: float  # two-sided paired t-test
    min_sig: float  # t_{0.975,n-1}·sd/√n
    mde80: float  # (t_{0.975,n-1} + t_{0.8,n-1})·sd/√n
    diverged: bool = False

    def as_dict(self) -> dict:
        return {
            k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in asdict(self).items()
        }


def describe(values: list[float]) -> tuple[float, float, int]:
    """Mean, standard deviation (ddof=1; NaN for one value) and count of the finite values."""
    v = np.array([x for x in values if math.isfinite(x)], dtype=float)
    if len(v) == 0:
        return math.nan, math.nan, 0
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else math.nan, len(v)


def paired(arm: dict[Hashable, float], ref: dict[Hashable, float]) -> Paired:
    """Paired comparison over the keys (seeds; or (group, seed) when pooling) both arms finished."""
    seeds = sorted(set(arm) & set(ref))
    a = np.array([arm[s] for s in seeds], dtype=float)
    b = np.array([ref[s] for s in seeds], dtype=float)
    n = len(seeds)
    nan = math.nan
    if n == 0:
        return Paired(0, nan, nan, nan, nan, nan, nan)
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return Paired(n, nan, nan, nan, nan, nan, nan, diverged=True)
    d = a - b
    mean = float(d.mean())
    if n < 2:
        return Paired(n, mean, nan, nan, nan, nan, nan)
    sd = float(d.std(ddof=1))
    se = sd / math.sqrt(n)
    t975 = float(sps.t.ppf(0.975, n - 1))
    t80 = float(sps.t.ppf(0.80, n - 1))
    if sd == 0.0:
        t, p = (math.copysign(math.inf, mean), 0.0) if mean != 0 else (nan, 1.0)
    else:
        res = sps.ttest_rel(a, b)
        t, p = float(res.statistic), float(res.pvalue)
    return Paired(n, mean, sd, t, p, t975 * se, (t975 + t80) * se)


def verdict(p: Paired, sign: int, alpha: float = 0.05) -> str:
    """``holds`` / ``contradicted`` at level ``alpha``, or why it is not resolved."""
    if p.diverged:
        return "not testable (a run diverged)"
    if p.n < 2 or not math.isfinite(p.p):
        return "not testable (fewer than 2 paired seeds)"
    if p.p < alpha:
        return "holds" if math.copysign(1, p.mean) == sign else "contradicted"
    return f"not resolved (|Δ| = {abs(p.mean):.4f} < {p.min_sig:.4f}, the smallest effect these seeds detect)"
