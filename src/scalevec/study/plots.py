"""The report's figures: loss curves, LR grids with their quadratic fits, paired differences, scale-vector
dynamics, loss against compute, and the WSD paired difference against step."""

from __future__ import annotations

import math
import re
from collections import defaultdict
from pathlib import Path

import numpy as np
from scipy import stats as sps

from scalevec.study.grids import NULL
from scalevec.study.loading import Run, arms_in_order, grid

UNIT = "nats/byte"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _panel_grid(plt, n: int):
    """A figure with one panel per group, at most three to a row."""
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    return plt.subplots(rows, cols, figsize=(5.0 * cols, 3.6 * rows), squeeze=False)


def _save(fig, path: Path, plt) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_grids(groups: dict[str, list[Run]], optima: dict[str, dict], path: Path) -> Path | None:
    """Score against the tuned value per arm (dots: seeds; line: the mean; x: the fitted optimum)."""
    if not groups:
        return None
    plt = _plt()
    fig, axes = _panel_grid(plt, len(groups))
    for ax, (g, runs) in zip(axes.flat, groups.items()):
        for i, arm in enumerate(a for a in arms_in_order(runs) if a != NULL):
            pts = grid(runs, arm)
            xs = sorted({x for x, _ in pts})
            means = [np.mean([v for (x2, _), v in pts.items() if x2 == x and math.isfinite(v)] or [np.nan])
                     for x in xs]
            color = f"C{i % 10}"
            ax.plot([x for x, _ in pts], list(pts.values()), ".", color=color, alpha=0.4)
            ax.plot(xs, means, "-", color=color, label=arm)
            opt = optima.get(g, {}).get(arm)
            if opt:
                ax.axvline(opt["lr"], color=color, ls=":", lw=1)
        axis = runs[0].spec.coords.get("axis", "lr")
        ax.set_xscale("log")
        ax.set_xlabel("gains' LR multiplier" if axis != "lr" else "peak LR")
        ax.set_ylabel(f"score ({UNIT})")
        ax.set_title(f"{g} (dotted: fitted optimum)", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(groups):]:
        ax.axis("off")
    return _save(fig, path, plt)


def plot_deltas(rows: list[dict], path: Path, title: str) -> Path | None:
    """Every claim row: Δ with its 95% CI and ±MDE (grey), by group and mode."""
    rows = [r for r in rows if r["delta"] is not None and math.isfinite(r["delta"])]
    if not rows:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(9.5, 1.6 + 0.34 * len(rows)))
    for i, r in enumerate(rows):
        lo, hi = r["ci95"]
        color = {"SUPPORTED": "C2", "CONTRADICTED": "C3", "BOUNDED": "C0"}.get(r["verdict"], "0.4")
        if r["mde"] is not None and math.isfinite(r["mde"]):
            ax.fill_betweenx([i - 0.35, i + 0.35], -r["mde"], r["mde"], color="0.85", lw=0)
        if lo is not None and math.isfinite(lo):
            ax.plot([lo, hi], [i, i], "-", color=color, lw=2)
        ax.plot(r["delta"], i, "o", color=color)
    ax.axvline(0, color="k", lw=0.8)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([f"{r['arm']} − {r['ref']} · {r['group']}" for r in rows], fontsize=7)
    ax.set_xlabel(f"Δ score ({UNIT}); bar: 95% CI; grey: ±MDE")
    ax.set_title(f"{title}: claims (green supported, red contradicted, blue bounded)", fontsize=9)
    ax.grid(alpha=0.3, axis="x")
    return _save(fig, path, plt)


def plot_curves(groups: dict[str, list[Run]], optima: dict[str, dict], path: Path, title: str) -> Path | None:
    """Validation loss over training per arm, at the grid point nearest its optimum (band: seeds' min–max)."""
    if not groups:
        return None
    plt = _plt()
    fig, axes = _panel_grid(plt, len(groups))
    for ax, (g, runs) in zip(axes.flat, groups.items()):
        for arm in arms_in_order(runs):
            xs = sorted({r.spec.coords["x"] for r in runs if r.spec.arm == arm})
            opt = optima.get(g, {}).get(arm, {}).get("lr", xs[len(xs) // 2])
            near = min(xs, key=lambda x: abs(math.log(x / opt)))
            curves = [[(m["tokens"], m["val_loss"]) for m in r.metrics() if "val_loss" in m] for r in runs
                      if r.spec.arm == arm and r.spec.coords["x"] == near and r.status == "done"]
            curves = [c for c in curves if c]
            if not curves:
                continue
            k = min(len(c) for c in curves)
            x = np.array([p[0] for p in curves[0][:k]]) / 1e6
            y = np.array([[p[1] for p in c[:k]] for c in curves])
            (line,) = ax.plot(x, y.mean(0), "-", label=f"{arm} (n={len(curves)})")
            ax.fill_between(x, y.min(0), y.max(0), color=line.get_color(), alpha=0.15, lw=0)
        ax.set_title(g, fontsize=9)
        ax.set_xlabel("tokens (M)")
        ax.set_ylabel(f"validation loss ({UNIT})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        tail = [ln.get_ydata()[len(ln.get_ydata()) // 3:] for ln in ax.get_lines()]
        if tail and all(len(t) for t in tail):
            t = np.concatenate(tail)
            pad = 0.1 * (t.max() - t.min() + 1e-3)
            ax.set_ylim(t.min() - pad, t.max() + pad)
    for ax in list(axes.flat)[len(groups):]:
        ax.axis("off")
    fig.suptitle(f"{title}: validation loss on a fixed slice (mean over seeds; band: min–max)", fontsize=10)
    return _save(fig, path, plt)


SITE_RE = re.compile(r"^gamma/(?:blocks\.(\d+)\.)?(.+)/(mean|std)$")


def plot_dynamics(run: Run, path: Path) -> Path | None:
    """One panel per gain site (``attn.q.in``, ``mlp.gate.out``, ...): mean γ per layer over training, band
    ± one standard deviation over the vector's entries; one legend for every panel."""
    series: dict[str, dict[str, dict[int, dict[str, float]]]] = defaultdict(lambda: defaultdict(dict))
    for m in run.metrics():
        if "val_loss" not in m:
            continue
        for k, v in m.items():
            hit = SITE_RE.match(k)
            if hit:
                series[hit.group(2)][hit.group(1) or "-"].setdefault(m["step"], {})[hit.group(3)] = v
    if not series:
        return None
    plt = _plt()
    sites = sorted(series)
    layers = sorted({la for s in series.values() for la in s}, key=lambda x: (x == "-", int(x) if x != "-" else 0))
    cmap = plt.get_cmap("viridis")
    colors = {la: cmap(i / max(1, len(layers) - 1)) for i, la in enumerate(layers)}
    cols = min(3, len(sites))
    rows = math.ceil(len(sites) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.9 * rows + 0.6), squeeze=False)
    for ax, site in zip(axes.flat, sites):
        for la, pts in sorted(series[site].items()):
            steps = sorted(pts)
            mean = np.array([pts[s].get("mean", np.nan) for s in steps])
            sd = np.array([pts[s].get("std", 0.0) for s in steps])
            ax.plot(steps, mean, "-", color=colors[la], lw=1.4)
            ax.fill_between(steps, mean - sd, mean + sd, color=colors[la], alpha=0.12, lw=0)
        ax.set_title(site, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.set_ylabel("γ (mean ± sd over entries)", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(sites):]:
        ax.axis("off")
    handles = [plt.Line2D([], [], color=colors[la], lw=2) for la in layers]
    labels = [f"layer {la}" if la != "-" else "outside blocks" for la in layers]
    fig.legend(handles, labels, loc="lower center", ncol=min(8, len(labels)), fontsize=8, frameon=False)
    fig.suptitle(f"scale vectors of {run.spec.arm} (seed {run.spec.seed}, group {run.spec.group})", fontsize=10)
    fig.tight_layout(rect=(0, 0.6 / (2.9 * rows + 0.6), 1, 1))
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def plot_compute(points: dict[str, dict[str, tuple[list, list]]], fits: dict, path: Path) -> Path | None:
    """Score against C = 6·N·D per setup and arm, with the baseline's fit where it was allowed."""
    if not points:
        return None
    plt = _plt()
    n = len(points)
    fig, axes = plt.subplots(1, n, figsize=(5 * n, 3.8), squeeze=False)
    for ax, (setup, arms) in zip(axes.flat, points.items()):
        for arm, (cs, ls) in arms.items():
            (line,) = ax.plot(cs, ls, "o", label=arm)
            f = fits.get(setup, {}).get(arm)
            if f is not None and f.ok:
                g = np.logspace(np.log10(min(cs)) - 0.1, np.log10(max(cs)) + 0.2, 50)
                ax.plot(g, f.loss(g), "-", color=line.get_color(), alpha=0.6, label=f"{arm}: fit, α={f.alpha:.2f}")
        ax.set_xscale("log")
        ax.set_xlabel("compute C = 6·N·D (FLOPs)")
        ax.set_ylabel(f"score ({UNIT})")
        ax.set_title(setup, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, path, plt)


def plot_wsd(wsd: dict[str, dict], path: Path) -> Path | None:
    """Unified − baseline against step for WSD runs: mean over seeds, 95% band, the stable phase shaded."""
    if not wsd:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(wsd), figsize=(5 * len(wsd), 3.6), squeeze=False)
    for ax, (g, w) in zip(axes.flat, wsd.items()):
        d = np.array(list(w["deltas"].values()))
        mean = d.mean(0)
        if len(d) > 1:
            half = sps.t.ppf(0.975, len(d) - 1) * d.std(0, ddof=1) / math.sqrt(len(d))
            ax.fill_between(w["steps"], mean - half, mean + half, color="C0", alpha=0.2, lw=0, label="95% CI")
        ax.plot(w["steps"], mean, "o-", color="C0", ms=3, label=f"mean over {len(d)} seeds")
        if w["stable"]:
            ax.axvspan(min(w["stable"]), max(w["stable"]), color="0.9", zorder=0, label="stable phase")
        ax.axhline(0, color="k", lw=0.8)
        s = w["slope"]
        slope = f"{s['slope']:+.4f}/1k steps, p={s['p']:.2g}" if s.get("p") is not None else "n/a"
        ax.set_title(f"{g}: slope over the stable phase {slope}", fontsize=8)
        ax.set_xlabel("step")
        ax.set_ylabel(f"unified − baseline ({UNIT})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, path, plt)
