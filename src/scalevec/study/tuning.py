"""Each arm at its own best learning rate: a quadratic in log LR through an arm's grid, with a bootstrap over
seeds, and every seed's loss read off its own quadratic at any LR inside the grid.

Also the compute multiplier measured directly: the token ratio at which the baseline, trained at several
token budgets with a schedule of its own each, reaches another arm's loss (interpolated in log tokens).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from scalevec.study.stats import bootstrap_ci

BOOTSTRAP = 2000


def _quadratic(x: np.ndarray, y: np.ndarray) -> np.ndarray | None:
    """Coefficients of y = a·x² + b·x + c through finite points (least squares when more than 3)."""
    keep = np.isfinite(y)
    if keep.sum() < 3:
        return None
    return np.polyfit(x[keep], y[keep], 2)


def _vertex(x: np.ndarray, y: np.ndarray) -> tuple[float, bool]:
    """log LR of the minimum: the quadratic's vertex when it is convex and inside the grid, else the best
    grid point (and ``False``: the optimum is at or beyond the grid's edge)."""
    coef = _quadratic(x, y)
    finite = np.isfinite(y)
    if not finite.any():
        return math.nan, False
    best = float(x[finite][np.argmin(y[finite])])
    if coef is None or coef[0] <= 0:
        return best, False
    v = float(-coef[1] / (2 * coef[0]))
    if not (x.min() <= v <= x.max()):
        return float(np.clip(v, x.min(), x.max())), False
    return v, True


@dataclass
class Optimum:
    lr: float  # fitted best LR (clipped to the grid)
    lo: float  # bootstrap 95% interval of the best LR over seeds
    hi: float
    inside: bool  # the fitted vertex lies inside the grid (else: widen the grid)
    grid: list[float]
    seeds: int

    def as_dict(self) -> dict:
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in asdict(self).items()}


def table(losses: dict[tuple[float, int], float]) -> tuple[np.ndarray, list[int], np.ndarray]:
    """(lr grid, seeds, matrix seeds × lrs) from {(lr, seed): loss}; NaN where a run is missing, +inf where
    it diverged (a diverged point leaves the fit)."""
    lrs = np.array(sorted({lr for lr, _ in losses}), float)
    seeds = sorted({s for _, s in losses})
    m = np.full((len(seeds), len(lrs)), math.nan)
    for (lr, s), v in losses.items():
        m[seeds.index(s), int(np.searchsorted(lrs, lr))] = v
    return lrs, seeds, m


def _complete(m: np.ndarray) -> np.ndarray:
    """Seeds with every grid point finished (a diverged point counts, as +inf)."""
    return m[~np.isnan(m).any(1)]


def fit_optimum(losses: dict[tuple[float, int], float], seed: int = 0) -> Optimum | None:
    """Best LR of one arm from its grid (mean over seeds), with a bootstrap over seeds."""
    if not losses:
        return None
    lrs, _, m = table(losses)
    m = _complete(m)
    if len(m) == 0:
        return None
    if len(lrs) == 1:  # a single point is its own optimum, with nothing to say about the edge
        return Optimum(float(lrs[0]), math.nan, math.nan, False, lrs.tolist(), len(m))
    x = np.log(lrs)
    mean = np.where(np.isinf(m).any(0), math.inf, m.mean(0) if len(m) else math.nan)
    v, inside = _vertex(x, np.where(np.isinf(mean), np.nan, mean))
    rng = np.random.default_rng(seed)
    reps = []
    for _ in range(BOOTSTRAP if len(m) > 1 else 0):
        sample = m[rng.integers(0, len(m), len(m))]
        mm = np.where(np.isinf(sample).any(0), np.nan, sample.mean(0))
        reps.append(_vertex(x, mm)[0])
    lo, hi = bootstrap_ci(np.array(reps)) if reps else (math.nan, math.nan)
    return Optimum(float(np.exp(v)), float(np.exp(lo)), float(np.exp(hi)), inside, lrs.tolist(), len(m))


def loss_at(losses: dict[tuple[float, int], float], lr: float) -> dict[int, float]:
    """Every seed's loss at ``lr``, read off the seed's own quadratic in log LR (its nearest grid point when
    fewer than 3 of its points are finite; +inf when every point diverged)."""
    lrs, seeds, m = table(losses)
    x, at = np.log(lrs), math.log(lr)
    out = {}
    for s, row in zip(seeds, m):
        if np.isnan(row).any():
            continue
        finite = np.isfinite(row)
        if not finite.any():
            out[s] = math.inf
            continue
        coef = _quadratic(x, np.where(finite, row, np.nan))
        if coef is None:
            near = int(np.argmin(np.where(finite, np.abs(x - at), np.inf)))
            out[s] = float(row[near])
        else:
            out[s] = float(np.polyval(coef, at))
    return out


@dataclass
class Multiplier:
    value: float  # token ratio at which the baseline reaches the arm's loss; NaN outside the measured range
    lo: float
    hi: float
    bound: str  # "" inside the range; ">1.5" / "<1" when the arm's loss lies outside the baseline's range
    ratios: list[float]
    lo_bound: str = ""  # the interval's ends outside the range, as ``bound``
    hi_bound: str = ""

    def as_dict(self) -> dict:
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in asdict(self).items()}


def _ratio_at(ratios: np.ndarray, base: np.ndarray, target: float) -> float:
    """Interpolate log(token ratio) linearly between the baseline's mean losses at ``target``."""
    order = np.argsort(base)
    b, logr = base[order], np.log(ratios[order])
    if not np.isfinite(b).all():
        return math.nan
    if target < b[0]:  # the arm beats the baseline's longest run: beyond the measured range
        return math.inf
    if target > b[-1]:  # worse than the baseline's shortest run: below it
        return 0.0
    return float(np.exp(np.interp(target, b, logr)))


def token_multiplier(base: dict[float, dict[int, float]], arm: dict[int, float], seed: int = 0) -> Multiplier:
    """``base``: {token ratio: {seed: loss}} of the baseline; ``arm``: {seed: loss} at ratio 1. Bootstrap over
    seeds (resampled jointly: a seed's runs share its data order)."""
    ratios = np.array(sorted(base), float)
    seeds = sorted(set(arm).intersection(*(set(base[r]) for r in ratios)))
    nan = math.nan
    if len(ratios) < 2 or not seeds:
        return Multiplier(nan, nan, nan, "", ratios.tolist())
    bm = np.array([[base[r][s] for r in ratios] for s in seeds])
    am = np.array([arm[s] for s in seeds])

    def one(rows: np.ndarray) -> float:
        return _ratio_at(ratios, bm[rows].mean(0), float(am[rows].mean()))

    def outside(x: float) -> str:  # 0 and inf stand for "below" and "beyond" the measured ratios
        return f">{ratios.max():.3g}" if x == math.inf else f"<{ratios.min():.3g}" if x == 0 else ""

    value = one(np.arange(len(seeds)))
    bound = outside(value)
    rng = np.random.default_rng(seed)
    reps = np.array([one(rng.integers(0, len(seeds), len(seeds))) for _ in range(BOOTSTRAP)]) if len(seeds) > 1 \
        else np.array([])
    reps = reps[~np.isnan(reps)]
    # Percentiles without interpolation, so replicates outside the range stay bounds instead of being dropped.
    lo, hi = (float(q) for q in np.quantile(reps, [0.025, 0.975], method="inverted_cdf")) if len(reps) >= 10 \
        else (nan, nan)
    return Multiplier(value if not bound else nan, lo, hi, bound, ratios.tolist(), outside(lo), outside(hi))
