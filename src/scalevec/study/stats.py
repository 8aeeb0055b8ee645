"""Statistics of a study: paired differences across seeds, Holm's correction, random-effects pooling, the
minimum detectable effect, verdicts, and a slope test.

Arms that share a seed share the data order (and the init where shapes agree), so a comparison is a paired
one: the per-seed difference ``d_i = L_arm,i − L_ref,i`` carries the test. Across groups (sizes, setups)
differences are never pooled as one sample: their noise differs by orders of magnitude, so groups are
combined by a DerSimonian–Laird random-effects meta-analysis that reports its heterogeneity.
"""

from __future__ import annotations

import math
from collections.abc import Hashable
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats as sps

ALPHA = 0.05
POWER = 0.8  # the power the minimum detectable effect assumes

SUPPORTED, CONTRADICTED, BOUNDED, NOT_RESOLVED = "SUPPORTED", "CONTRADICTED", "BOUNDED", "NOT RESOLVED"


def _clean(d: dict) -> dict:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


@dataclass
class Paired:
    n: int
    mean: float  # mean of arm − ref
    sd: float  # standard deviation of the per-seed differences (ddof=1)
    lo: float  # 95% confidence interval of the mean (t distribution)
    hi: float
    t: float
    p: float  # two-sided paired t-test
    diverged: bool = False

    @property
    def se(self) -> float:
        return self.sd / math.sqrt(self.n) if self.n > 1 else math.nan

    def as_dict(self) -> dict:
        return _clean(asdict(self))


def describe(values: list[float]) -> tuple[float, float, int]:
    """Mean, standard deviation (ddof=1; NaN for one value) and count of the finite values."""
    v = np.array([x for x in values if math.isfinite(x)], dtype=float)
    if len(v) == 0:
        return math.nan, math.nan, 0
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else math.nan, len(v)


def paired(arm: dict[Hashable, float], ref: dict[Hashable, float]) -> Paired:
    """Paired comparison over the seeds both arms finished."""
    seeds = sorted(set(arm) & set(ref))
    a = np.array([arm[s] for s in seeds], dtype=float)
    b = np.array([ref[s] for s in seeds], dtype=float)
    n, nan = len(seeds), math.nan
    if n == 0:
        return Paired(0, nan, nan, nan, nan, nan, nan)
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return Paired(n, nan, nan, nan, nan, nan, nan, diverged=True)
    d = a - b
    mean = float(d.mean())
    if n < 2:
        return Paired(n, mean, nan, nan, nan, nan, nan)
    sd = float(d.std(ddof=1))
    half = float(sps.t.ppf(1 - ALPHA / 2, n - 1)) * sd / math.sqrt(n)
    if sd == 0.0:
        t, p = (math.copysign(math.inf, mean), 0.0) if mean != 0 else (nan, 1.0)
    else:
        res = sps.ttest_1samp(d, 0.0)
        t, p = float(res.statistic), float(res.pvalue)
    return Paired(n, mean, sd, mean - half, mean + half, t, p)


def mde(sd: float, n: int, alpha: float = ALPHA, power: float = POWER) -> float:
    """The true paired effect that a two-sided t-test at ``alpha`` detects with ``power`` from ``n`` seeds
    whose differences have standard deviation ``sd``."""
    if n < 2 or not math.isfinite(sd):
        return math.nan
    df = n - 1
    return (float(sps.t.ppf(1 - alpha / 2, df)) + float(sps.t.ppf(power, df))) * sd / math.sqrt(n)


def holm(ps: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values (family-wise error at the nominal level); NaN stays NaN."""
    idx = [i for i, p in enumerate(ps) if math.isfinite(p)]
    order = sorted(idx, key=lambda i: ps[i])
    m, out, running = len(order), [math.nan] * len(ps), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * ps[i]))
        out[i] = running
    return out


@dataclass
class Pooled:
    k: int  # groups
    mean: float
    lo: float
    hi: float
    p: float
    tau2: float  # between-group variance of the true effects
    i2: float  # share of the total variation due to heterogeneity (0..1)
    q: float  # Cochran's Q

    def as_dict(self) -> dict:
        return _clean(asdict(self))


def random_effects(means: list[float], ses: list[float]) -> Pooled:
    """DerSimonian–Laird random-effects pooling of per-group effects with standard errors ``ses``, its
    interval and p from the (modified) Hartung–Knapp–Sidik–Jonkman t statistic."""
    y, se = np.asarray(means, float), np.asarray(ses, float)
    keep = np.isfinite(y) & np.isfinite(se) & (se > 0)
    y, v = y[keep], se[keep] ** 2
    k, nan = len(y), math.nan
    if k < 2:
        return Pooled(k, nan, nan, nan, nan, nan, nan, nan)
    w = 1 / v
    fixed = float((w * y).sum() / w.sum())
    q = float((w * (y - fixed) ** 2).sum())
    c = float(w.sum() - (w**2).sum() / w.sum())
    tau2 = max(0.0, (q - (k - 1)) / c) if c > 0 else 0.0
    ws = 1 / (v + tau2)
    mean = float((ws * y).sum() / ws.sum())
    # Hartung–Knapp–Sidik–Jonkman: a t_{k−1} interval on a rescaled variance, never narrower than DL's own,
    # since a few groups with few seeds each estimate their standard errors poorly.
    hk = float((ws * (y - mean) ** 2).sum() / ((k - 1) * ws.sum()))
    se_pooled = math.sqrt(max(1 / float(ws.sum()), hk))
    t = float(sps.t.ppf(1 - ALPHA / 2, k - 1))
    p = float(2 * sps.t.sf(abs(mean) / se_pooled, k - 1))
    i2 = max(0.0, (q - (k - 1)) / q) if q > 0 else 0.0
    return Pooled(k, mean, mean - t * se_pooled, mean + t * se_pooled, p, tau2, i2, q)


def verdict(mean: float, lo: float, hi: float, p_holm: float, sign: int, bound: float) -> str:
    """SUPPORTED / CONTRADICTED at Holm-corrected p < 0.05 (by the direction of the effect against the
    paper's ``sign``); BOUNDED when the whole CI lies inside ±``bound`` (the MDE); NOT RESOLVED otherwise."""
    if math.isfinite(p_holm) and p_holm < ALPHA and math.isfinite(mean) and mean != 0:
        return SUPPORTED if math.copysign(1, mean) == sign else CONTRADICTED
    if all(math.isfinite(x) for x in (lo, hi, bound)) and -bound <= lo and hi <= bound:
        return BOUNDED
    return NOT_RESOLVED


@dataclass
class Slope:
    n: int  # seeds
    slope: float  # mean over seeds of the least-squares slope of Δ against step (nats per 1000 steps)
    lo: float
    hi: float
    p: float

    def as_dict(self) -> dict:
        return _clean(asdict(self))


def slope_test(steps: list[int], deltas: dict[Hashable, list[float]]) -> Slope:
    """Is the paired Δ trending over ``steps``? One least-squares slope per seed (a seed's evaluations are
    correlated, its slope is one observation), then a one-sample t-test of the slopes against 0."""
    x = np.asarray(steps, float) / 1000.0
    slopes = [float(np.polyfit(x, np.asarray(d, float), 1)[0]) for d in deltas.values() if len(d) == len(x)]
    n, nan = len(slopes), math.nan
    if n < 2 or len(x) < 2:
        return Slope(n, slopes[0] if slopes else nan, nan, nan, nan)
    s = np.asarray(slopes)
    half = float(sps.t.ppf(1 - ALPHA / 2, n - 1)) * float(s.std(ddof=1)) / math.sqrt(n)
    p = float(sps.ttest_1samp(s, 0.0).pvalue) if s.std() > 0 else (0.0 if s.mean() != 0 else 1.0)
    return Slope(n, float(s.mean()), float(s.mean()) - half, float(s.mean()) + half, p)


def bootstrap_ci(values: np.ndarray, alpha: float = ALPHA) -> tuple[float, float]:
    """Percentile interval of bootstrap replicates (non-finite replicates dropped)."""
    v = np.asarray(values, float)
    v = v[np.isfinite(v)]
    if len(v) < 10:
        return math.nan, math.nan
    return float(np.quantile(v, alpha / 2)), float(np.quantile(v, 1 - alpha / 2))
