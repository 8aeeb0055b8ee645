"""``scalevec report DIR``: tables, paired significance, claim verdicts and plots, all read from run files.

Writes into the report folder: ``README.md`` (the report), ``results.json`` (every number in it), ``runs.csv``
(one row per run: its summary), and PNG plots (loss curves, LR sweeps, loss vs compute with the fitted
``L(C) = E + A·C^−α``, scale-vector dynamics per site and layer).
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from scalevec.study.grids import STUDIES, Claim, best_lrs, fmt_lr
from scalevec.study.scaling import fit_power_law, fitted_multiplier, interpolated_multipliers
from scalevec.study.spec import RunSpec
from scalevec.study.stats import Paired, describe, paired, verdict
from scalevec.typed_config import ConfigError


@dataclass
class Run:
    spec: RunSpec
    path: Path
    status: str
    summary: dict = field(default_factory=dict)
    resources: dict = field(default_factory=dict)

    @property
    def loss(self) -> float | None:
        if "final_val_loss" in self.summary:
            return float(self.summary["final_val_loss"])
        return math.inf if self.status == "diverged" else None

    def metrics(self) -> list[dict]:
        p = self.path / "metrics.jsonl"
        return [json.loads(ln) for ln in p.read_text().splitlines() if ln] if p.is_file() else []

    @property
    def compute(self) -> float:
        """C = 6·N·D, N = non-embedding (active for MoE) parameters, D = training tokens."""
        s = self.summary
        n = s.get("active_non_embedding_params", s.get("non_embedding_params", math.nan))
        return 6.0 * n * s.get("tokens", math.nan)


def _read_json(p: Path) -> dict:
    return json.loads(p.read_text()) if p.is_file() else {}


def load_study(study_dir: Path) -> tuple[dict, list[Run]]:
    man_path = study_dir / "study.json"
    if not man_path.is_file():
        raise ConfigError(f"report: {study_dir} holds no study.json")
    man = json.loads(man_path.read_text())
    runs = []
    seen: set[tuple[str, str]] = set()
    for r in man["runs"]:
        spec = RunSpec.from_json(r)
        if (spec.group, spec.key) in seen:  # the same run listed twice in one group (e.g. sweep and main)
            continue
        seen.add((spec.group, spec.key))
        path = (study_dir / r["run_dir"]).resolve()
        summary = _read_json(path / "summary.json")
        failed = _read_json(path / "failed.json")
        status = "done" if summary else failed.get("kind", "missing")
        runs.append(Run(spec, path, status, summary, _read_json(path / "resources.json")))
    return man, runs


def groups_of(runs: list[Run]) -> dict[str, list[Run]]:
    out: dict[str, list[Run]] = defaultdict(list)
    for r in runs:
        out[r.spec.group].append(r)
    return out


def by_seed(runs: list[Run], arm: str) -> dict[int, float]:
    return {r.spec.seed: r.loss for r in runs if r.spec.arm == arm and r.loss is not None}


def arms_in_order(runs: list[Run]) -> list[str]:
    return list(dict.fromkeys(r.spec.arm for r in runs))


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_").lower()


def _f(x: float | None, nd: int = 4, sign: bool = False) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "—"
    return f"{x:+.{nd}f}" if sign else f"{x:.{nd}f}"


def _p(p: float) -> str:
    if not math.isfinite(p):
        return "—"
    return f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"


# --------------------------------------------------------------------------------------------------- tables


def comparison_table(group: str, runs: list[Run]) -> tuple[list[str], dict]:
    base = runs[0].spec.baseline
    ref = by_seed(runs, base)
    lines = [
        f"### {group}",
        "",
        (
            f"| arm | peak LR | seeds | final val loss (mean ± std) | Δ vs {base} (paired mean ± sd) | "
            "p (paired t) | "
            "smallest detectable Δ (p<0.05) | 80%-power MDE |"
        ),
        "|---|---|---|---|---|---|---|---|",
    ]
    rows = {}
    for arm in arms_in_order(runs):
        vals = by_seed(runs, arm)
        mean, std, n = describe(list(vals.values()))
        diverged = sum(1 for v in vals.values() if not math.isfinite(v))
        row: dict = {"n": n, "mean": mean, "std": std, "diverged": diverged}
        cells = [f"{mean:.4f} ± {_f(std)}" if n else "—"]
        if arm == base:
            cells += ["(reference)", "", "", ""]
        else:
            pr = paired(vals, ref)
            row["paired"] = pr.as_dict()
            cells += [
                f"{_f(pr.mean, sign=True)} ± {_f(pr.sd)}" if pr.n else "—",
                _p(pr.p),
                _f(pr.min_sig),
                _f(pr.mde80),
            ]
        seeds = f"{n}" + (f" (+{diverged} diverged)" if diverged else "")
        lr = next((r.spec.overrides.get("optim.lr") for r in runs if r.spec.arm == arm), None)
        row["lr"] = float(lr) if lr else None
        lines.append(f"| {arm} | {fmt_lr(float(lr)) if lr else '—'} | {seeds} | " + " | ".join(cells) + " |")
        rows[arm] = {
            k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()
        }
    sig = [
        r["paired"]["min_sig"] for r in rows.values() if "paired" in r and r["paired"]["min_sig"] is not None
    ]
    lines += [
        "",
        f"Smallest effect these seeds could detect (median over arms, p < 0.05, two-sided paired t): "
        f"**{_f(float(np.median(sig)) if sig else math.nan)} nats**."
        if sig
        else "Fewer than 2 paired seeds: no significance test is possible.",
        "",
    ]
    return lines, {"baseline": base, "arms": rows}


def sweep_table(group: str, runs: list[Run]) -> tuple[list[str], dict]:
    cell: dict[tuple[str, float], list[float]] = defaultdict(list)
    for r in runs:
        if r.loss is not None:
            cell[(r.spec.coords["strategy"], r.spec.coords["lr"])].append(r.loss)
    strategies = list(dict.fromkeys(r.spec.coords["strategy"] for r in runs))
    lrs = sorted({r.spec.coords["lr"] for r in runs})
    best = best_lrs(
        [r.spec for r in runs], lambda sp: next((r.loss for r in runs if r.spec.key == sp.key), None)
    )
    lines = [
        f"### {group}",
        "",
        ("Final validation loss (mean over sweep seeds; **bold**: best LR of the strategy; ∞: diverged)."),
        "",
        "| strategy | " + " | ".join(f"lr={fmt_lr(x)}" for x in lrs) + " | best LR |",
        "|---|" + "---|" * (len(lrs) + 1),
    ]
    for s in strategies:
        cells = []
        for lr in lrs:
            v = cell.get((s, lr))
            if not v:
                cells.append("—")
                continue
            m = sum(v) / len(v)
            txt = "∞" if not math.isfinite(m) else f"{m:.4f}"
            cells.append(f"**{txt}**" if s in best and best[s]["lr"] == lr else txt)
        b = best.get(s)
        edge = " (grid edge: widen the grid)" if b and b["at_grid_edge"] else ""
        lines.append(f"| {s} | " + " | ".join(cells) + f" | {fmt_lr(b['lr']) if b else '—'}{edge} |")
    lines.append("")
    return lines, {"best_lr": best}


def claim_lines(claims: list[Claim], groups: dict[str, list[Run]]) -> tuple[list[str], list[dict]]:
    lines, out = [], []
    for c in claims:
        pooled_arm: dict[tuple[str, int], float] = {}
        pooled_ref: dict[tuple[str, int], float] = {}
        for g, runs in groups.items():
            if c.group not in g:
                continue
            arms = set(arms_in_order(runs))
            if c.arm not in arms or c.ref not in arms:
                continue
            a, r = by_seed(runs, c.arm), by_seed(runs, c.ref)
            pooled_arm.update({(g, s): v for s, v in a.items()})
            pooled_ref.update({(g, s): v for s, v in r.items()})
            pr: Paired = paired(a, r)
            v = verdict(pr, c.sign)
            out.append(
                {"claim": c.text, "group": g, "arm": c.arm, "ref": c.ref, "verdict": v, **pr.as_dict()}
            )
            lines.append(
                f"- **{v.split(' (')[0].upper()}** — {c.text} [{g}: {c.arm} − {c.ref} = "
                f"{_f(pr.mean, sign=True)} nats, p = {_p(pr.p)}, n = {pr.n}]"
                + (f" — {v[v.index('(') :]}" if "(" in v else "")
            )
        groups_hit = {g for g, _ in pooled_arm.keys() & pooled_ref.keys()}
        if len(groups_hit) > 1:  # one line over every (group, seed) pair: the claim "in general"
            pr = paired(pooled_arm, pooled_ref)
            v = verdict(pr, c.sign)
            lower = sum(1 for k in pooled_arm.keys() & pooled_ref.keys() if pooled_arm[k] < pooled_ref[k])
            out.append(
                {"claim": c.text, "group": "pooled", "arm": c.arm, "ref": c.ref, "verdict": v, **pr.as_dict()}
            )
            lines.append(
                f"- **{v.split(' (')[0].upper()}** (pooled over {len(groups_hit)} groups, {pr.n} paired "
                f"runs; {c.arm} lower in {lower}) — {c.text} [{c.arm} − {c.ref} = {_f(pr.mean, sign=True)} "
                f"nats, p = {_p(pr.p)}]"
            )
    return lines, out


# ---------------------------------------------------------------------------------------------------- plots


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(groups: dict[str, list[Run]], path: Path, title: str) -> Path | None:
    main = {g: rs for g, rs in groups.items() if rs[0].spec.baseline is not None}
    if not main:
        return None
    plt = _plt()
    n = len(main)
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.8 * rows), squeeze=False)
    for ax, (g, runs) in zip(axes.flat, main.items()):
        for arm in arms_in_order(runs):
            curves = []
            for r in runs:
                if r.spec.arm == arm and r.status == "done":
                    ev = [(m["tokens"], m["val_loss"]) for m in r.metrics() if "val_loss" in m]
                    if ev:
                        curves.append(ev)
            if not curves:
                continue
            k = min(len(c) for c in curves)
            x = np.array([p[0] for p in curves[0][:k]]) / 1e6
            y = np.array([[p[1] for p in c[:k]] for c in curves])
            (line,) = ax.plot(x, y.mean(0), "o-", ms=3, label=f"{arm} (n={len(curves)})")
            if len(curves) > 1:
                ax.fill_between(x, y.min(0), y.max(0), color=line.get_color(), alpha=0.15)
        ax.set_title(g, fontsize=9)
        ax.set_xlabel("tokens (M)")
        ax.set_ylabel("validation loss")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[1]:
            ax.legend(fontsize=7)
        # the interesting part is the end: zoom on the last 60% of the run
        ys = [ln.get_ydata() for ln in ax.get_lines()]
        if ys and all(len(y) > 2 for y in ys):
            tail = np.concatenate([y[len(y) // 3 :] for y in ys])
            pad = 0.1 * (tail.max() - tail.min() + 1e-3)
            ax.set_ylim(tail.min() - pad, tail.max() + pad)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle(f"{title}: validation loss (mean over seeds; band: min–max)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_final(groups: dict[str, list[Run]], path: Path, title: str) -> Path | None:
    """Per-seed paired differences vs the baseline: the picture behind the t-test."""
    main = {g: rs for g, rs in groups.items() if rs[0].spec.baseline is not None}
    if not main:
        return None
    plt = _plt()
    fig, ax = plt.subplots(
        figsize=(max(5.0, 1.0 + 0.7 * sum(len(arms_in_order(r)) - 1 for r in main.values())), 3.8)
    )
    labels, pos = [], 0
    for g, runs in main.items():
        ref = by_seed(runs, runs[0].spec.baseline)
        for arm in arms_in_order(runs):
            if arm == runs[0].spec.baseline:
                continue
            vals = by_seed(runs, arm)
            d = [vals[s] - ref[s] for s in sorted(set(vals) & set(ref)) if math.isfinite(vals[s] - ref[s])]
            if d:
                ax.plot([pos] * len(d), d, "o", alpha=0.6, color="C0")
                ax.plot([pos - 0.25, pos + 0.25], [np.mean(d)] * 2, "-", color="C3", lw=2)
            labels.append(arm if len(main) == 1 else f"{arm}\n{g}")
            pos += 1
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, fontsize=7)
    ax.set_ylabel("Δ final val loss vs baseline (nats)")
    ax.set_title(f"{title}: per-seed paired differences (red: mean)", fontsize=10)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_sweep(group: str, runs: list[Run], path: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for s in dict.fromkeys(r.spec.coords["strategy"] for r in runs):
        pts: dict[float, list[float]] = defaultdict(list)
        for r in runs:
            if r.spec.coords["strategy"] == s and r.loss is not None and math.isfinite(r.loss):
                pts[r.spec.coords["lr"]].append(r.loss)
        if pts:
            xs = sorted(pts)
            ax.plot(xs, [np.mean(pts[x]) for x in xs], "o-", label=s)
    ax.set_xscale("log")
    ax.set_xlabel("peak LR")
    ax.set_ylabel("final validation loss")
    ax.set_title(f"{group} (missing points: diverged)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


SITE_RE = re.compile(r"^gamma/(?:blocks\.(\d+)\.)?(.+)/(mean|std|min|max|magnitude)$")


def plot_dynamics(run: Run, path: Path) -> Path | None:
    """Mean γ (band: min–max over the vector) per site, one line per layer, over training."""
    rows = [m for m in run.metrics() if "val_loss" in m]
    series: dict[str, dict[str, list[tuple[int, float, float, float]]]] = defaultdict(
        lambda: defaultdict(list)
    )
    for m in rows:
        for k, v in m.items():
            hit = SITE_RE.match(k)
            if hit and hit.group(3) == "mean":
                layer, site = hit.group(1) or "-", hit.group(2)
                lo, hi = m.get(k[:-4] + "min", v), m.get(k[:-4] + "max", v)
                series[site][layer].append((m["step"], v, lo, hi))
    if not series:
        return None
    plt = _plt()
    sites = sorted(series)
    cols = min(4, len(sites))
    nrows = math.ceil(len(sites) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.6 * cols, 2.7 * nrows), squeeze=False)
    for ax, site in zip(axes.flat, sites):
        for layer, pts in sorted(series[site].items()):
            steps = [p[0] for p in pts]
            (line,) = ax.plot(
                steps, [p[1] for p in pts], "-o", ms=2, label=f"layer {layer}" if layer != "-" else ""
            )
            ax.fill_between(
                steps, [p[2] for p in pts], [p[3] for p in pts], color=line.get_color(), alpha=0.08
            )
        ax.set_title(site, fontsize=8)
        ax.set_xlabel("step", fontsize=7)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(sites) :]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if any(labels):
        fig.legend(handles, labels, loc="lower right", fontsize=7)
    fig.suptitle(
        f"scale vectors of {run.spec.arm} (seed {run.spec.seed}): mean γ per layer, band min–max", fontsize=9
    )
    fig.tight_layout()
    fig.savefig(path, dpi=70)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------- scaling fit


def scaling_section(groups: dict[str, list[Run]], out: Path) -> tuple[list[str], dict]:
    """Loss vs compute per setup and strategy; fits and compute multipliers (unified study)."""
    per_setup: dict[str, dict[str, dict[float, list[float]]]] = defaultdict(
        lambda: defaultdict(lambda: defaultdict(list))
    )
    for runs in groups.values():
        for r in runs:
            if "setup" in r.spec.coords and r.loss is not None and math.isfinite(r.loss):
                per_setup[r.spec.coords["setup"]][r.spec.arm][r.compute].append(r.loss)
    if not per_setup:
        return [], {}
    plt = _plt()
    lines = [
        "## Loss vs compute",
        "",
        (
            "C = 6·N·D (N: non-embedding parameters, active ones for MoE; D: training tokens). "
            "Fit per strategy: "
            "`L(C) = E + A·C^-α` (least squares over the mean loss of each size). The compute multiplier is "
            "C_baseline(L) / C_unified(L) at equal loss: from the fits at the baseline's loss at its largest "
            "size, and model-free by interpolating the baseline's measured points (log C linear in L) at "
            "unified's measured losses."
        ),
        "",
        "| setup | strategy | sizes | E | A | α | fit | multiplier (fit) | multiplier (interpolated) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    result: dict = {}
    n = len(per_setup)
    fig, axes = plt.subplots(1, n, figsize=(5 * n, 3.8), squeeze=False)
    for ax, (setup, arms) in zip(axes.flat, per_setup.items()):
        fits, pts = {}, {}
        for arm, d in arms.items():
            cs = sorted(d)
            ls = [float(np.mean(d[c])) for c in cs]
            pts[arm] = (cs, ls)
            fits[arm] = fit_power_law(cs, ls)
            (line,) = ax.plot(cs, ls, "o", label=arm)
            f = fits[arm]
            if math.isfinite(f.alpha):
                grid = np.logspace(np.log10(min(cs)) - 0.2, np.log10(max(cs)) + 0.3, 50)
                ax.plot(
                    grid,
                    f.loss(grid),
                    "-",
                    color=line.get_color(),
                    alpha=0.6,
                    label=f"{arm}: E={f.E:.2f}, α={f.alpha:.2f}" + ("" if f.ok else " (ill-conditioned)"),
                )
        res_setup: dict = {"fits": {a: f.as_dict() for a, f in fits.items()}, "points": pts}
        for arm, f in fits.items():
            mult_fit, mult_int = "—", "—"
            if arm != "baseline" and "baseline" in fits:
                target = pts["baseline"][1][-1]
                mf = fitted_multiplier(fits["baseline"], f, target)
                im = interpolated_multipliers(*pts["baseline"], *pts[arm])
                res_setup[f"multiplier_fit_{arm}"] = mf if math.isfinite(mf) else None
                res_setup[f"multiplier_interp_{arm}"] = im
                if math.isfinite(mf):
                    caveat = "" if fits["baseline"].ok and f.ok else " (unreliable: see fit)"
                    mult_fit = f"{mf:.2f}x at L={target:.3f}{caveat}"
                elif not (math.isfinite(fits["baseline"].alpha) and math.isfinite(f.alpha)):
                    mult_fit = "no fit"
                else:
                    mult_fit = "undefined (a fitted curve never reaches that loss)"
                mult_int = (
                    ", ".join(f"{m:.2f}x (C={c:.1e})" for c, m in im)
                    if im
                    else "none inside the baseline's range"
                )
            a_txt = f"{f.A:.3g}" if math.isfinite(f.A) else "—"
            lines.append(
                f"| {setup} | {arm} | {f.n} | {_f(f.E, 3)} | {a_txt} | {_f(f.alpha, 3)} | {f.note} | "
                f"{mult_fit} | {mult_int} |"
            )
        result[setup] = res_setup
        ax.set_xscale("log")
        ax.set_xlabel("compute C = 6·N·D (FLOPs)")
        ax.set_ylabel("final validation loss")
        ax.set_title(setup, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out / "loss_vs_compute.png", dpi=90)
    plt.close(fig)
    lines += [
        "",
        (
            "The paper reports 1.22–1.25x for unified at 0.12B–2B and 100 tokens/parameter. With 3 sizes "
            "the 3-parameter fit interpolates exactly: its multiplier is shown, but only the interpolated, "
            "model-free numbers are evidence here."
        ),
        "",
        "![loss vs compute](loss_vs_compute.png)",
        "",
    ]
    return lines, result


# ------------------------------------------------------------------------------------------------- overhead


def overhead_section(groups: dict[str, list[Run]], repo: Path) -> tuple[list[str], dict]:
    """Step time and peak memory of each arm relative to its same-seed baseline run in the same group."""
    ratios: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    seen: set[tuple[str, str]] = set()  # a pair of runs listed in two groups counts once
    for runs in groups.values():
        base_arm = runs[0].spec.baseline
        if base_arm is None:
            continue
        base = {r.spec.seed: r for r in runs if r.spec.arm == base_arm and r.summary}
        for r in runs:
            b = base.get(r.spec.seed)
            if r.spec.arm == base_arm or not r.summary or b is None or (r.spec.key, b.spec.key) in seen:
                continue
            seen.add((r.spec.key, b.spec.key))
            ratios[r.spec.arm]["step_time"].append(b.summary["tok_per_s"] / r.summary["tok_per_s"])
            if r.resources.get("peak_rss_mib") and b.resources.get("peak_rss_mib"):
                ratios[r.spec.arm]["peak_rss"].append(
                    r.resources["peak_rss_mib"] / b.resources["peak_rss_mib"]
                )
            if r.resources.get("peak_cuda_mib") and b.resources.get("peak_cuda_mib"):
                ratios[r.spec.arm]["peak_cuda"].append(
                    r.resources["peak_cuda_mib"] / b.resources["peak_cuda_mib"]
                )
    if not ratios:
        return [], {}
    lines = [
        "## Overhead",
        "",
        (
            "Ratios to the same-seed baseline run of the same comparison (geometric mean over pairs). "
            "Step time "
            "is the inverse of the run's mean training throughput (tokens/s over the whole run, evaluation "
            "included); runs that shared a busy machine with other jobs give ratios that are only indicative "
            "(±10% or worse). "
            "Peak memory is the process's peak resident set (CPU) — dominated by the framework for models "
            "this "
            "small — or peak CUDA memory where a GPU ran."
        ),
        "",
        "| arm | pairs | step time ratio | peak memory ratio |",
        "|---|---|---|---|",
    ]
    out = {}
    for arm, d in ratios.items():
        gm = {k: float(np.exp(np.mean(np.log(v)))) for k, v in d.items() if v}
        mem = gm.get("peak_cuda", gm.get("peak_rss"))
        lines.append(
            f"| {arm} | {len(d['step_time'])} | {gm['step_time']:.3f}x | {_f(mem, 3) + 'x' if mem else '—'} |"
        )
        out[arm] = gm
    perf = repo / "docs" / "performance.md"
    if perf.is_file():
        lines += ["", "Dedicated benchmark (same-process, interleaved): see `docs/performance.md`."]
    lines.append("")
    return lines, out


# ---------------------------------------------------------------------------------------------------- main


def _setup_line(runs: list[Run]) -> str:
    s = next((r.summary for r in runs if r.summary), None)
    if not s:
        return "No finished runs yet."
    return (
        f"Model {s['model']} ({s.get('non_embedding_params', 0) / 1e6:.2f}M non-embedding parameters), "
        f"{s['optimizer']}, {s['schedule']} schedule, {s['steps']} steps, "
        f"{s['tokens'] / 1e6:.2f}M tokens per "
        f"run (first finished run; the unified study varies these), device {s['device']}."
    )


def _budget_diff(name: str, budget: str, knobs: dict) -> str:
    from scalevec.study.grids import knobs_for

    try:
        default = knobs_for(name, budget).to_json()
    except ConfigError:
        return ""
    parts = []
    for k, v in knobs.items():
        if k not in default or v == default[k]:
            continue
        if isinstance(v, list) and isinstance(default[k], list) and all(isinstance(x, str) for x in v):
            added = [x for x in v if x not in default[k]]
            removed = [x for x in default[k] if x not in v]
            if not added and not removed:  # the same overrides in another order
                continue
            parts.append(
                f"`{k}` "
                + " ".join([f"+{json.dumps(x)}" for x in added] + [f"−{json.dumps(x)}" for x in removed])
            )
        else:
            parts.append(f"`{k}` {json.dumps(default[k])} → {json.dumps(v)}")
    return ", ".join(parts)


def _seeds_line(runs: list[Run]) -> str:
    """Seeds per arm as the run files have them: comparisons and sweep points may differ (necessity)."""
    def count(sweep: bool) -> str:
        seeds: dict[tuple[str, str], set[int]] = defaultdict(set)
        for r in runs:
            if (r.spec.baseline is None) == sweep:
                seeds[r.spec.group, r.spec.arm].add(r.spec.seed)
        n = sorted({len(v) for v in seeds.values()})
        return "" if not n else str(n[0]) if len(n) == 1 else f"{n[0]}–{n[-1]}"
    main, sweep = count(False), count(True)
    parts = ([f"Seeds per arm: {main}"] if main else []) + ([f"seeds per LR-sweep point: {sweep}"] if sweep else [])
    text = "; ".join(parts)
    return text[:1].upper() + text[1:] + "." if text else ""


def write_report(study_dir: Path, out: Path | None = None) -> Path:
    study_dir = Path(study_dir)
    man, runs = load_study(study_dir)
    name = man["study"]
    study = STUDIES.get(name)
    out = Path(out) if out else study_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.png"):
        old.unlink()
    groups = groups_of(runs)
    knobs = man["knobs"]
    status = {r.spec.key: r.status for r in runs}
    done = sum(v == "done" for v in status.values())
    lines = [
        f"# Study `{name}`",
        "",
        study.doc if study else "",
        "",
        f"Budget `{man['budget']}`; {len(status)} distinct runs, {done} finished "
        f"({sum(v == 'diverged' for v in status.values())} diverged, "
        f"{sum(v not in ('done', 'diverged') for v in status.values())} not finished). "
        f"{_seeds_line(runs)} "
        "Every arm shares init seed and data order with its baseline (paired runs). " + _setup_line(runs),
        "",
        (
            "Generated by `scalevec report` from the run files; every number below is in `results.json`, "
            "every "
            "run's summary in `runs.csv`."
        ),
        "",
    ]
    budget_knobs = _budget_diff(name, man["budget"], knobs)
    if budget_knobs:
        lines += [f"Knobs changed from the `{man['budget']}` budget's defaults: {budget_knobs}.", ""]
    if man.get("command"):
        lines += ["Reproduce (a rerun skips finished runs):", "", "```bash", man["command"], "```", ""]
    results: dict = {"study": name, "budget": man["budget"], "knobs": knobs, "groups": {}}

    claims: list[str] = []
    if study and study.claims:
        claims, results["claims"] = claim_lines(study.claims, groups)
    if claims:
        lines += [
            "## Claims of the paper at this scale",
            "",
            (
                "Verdict per claim: HOLDS / CONTRADICTED at p < 0.05 (two-sided paired t-test across seeds), "
                "otherwise NOT RESOLVED with the smallest effect the seeds could detect."
            ),
            "",
            *claims,
            "",
        ]

    lines += ["## Results", ""]
    for g, rs in groups.items():
        if rs[0].spec.baseline is None:
            tl, res = sweep_table(g, rs)
            png = plot_sweep(g, rs, out / f"sweep_{slug(g)}.png")
            tl += [f"![{g}]({png.name})", ""]
        else:
            tl, res = comparison_table(g, rs)
        lines += tl
        results["groups"][g] = res

    curves = plot_curves(groups, out / "loss_curves.png", name)
    finals = plot_final(groups, out / "paired_deltas.png", name)
    if curves:
        lines += ["## Plots", "", "![loss curves](loss_curves.png)", ""]
    if finals:
        lines += ["![paired differences](paired_deltas.png)", ""]

    sl, sres = scaling_section(groups, out)
    lines += sl
    if sres:
        results["scaling"] = sres

    # Scale-vector dynamics: seed 0 of each arm of the first comparison (at most 6 arms).
    first = next((rs for rs in groups.values() if rs[0].spec.baseline is not None), None)
    dyn = []
    if first:
        for arm in arms_in_order(first)[:6]:
            r = next((r for r in first if r.spec.arm == arm and r.status == "done"), None)
            if r:
                p = plot_dynamics(r, out / f"gamma_{slug(arm)}.png")
                if p:
                    dyn.append((arm, p.name))
    if dyn:
        lines += [
            "## Scale-vector dynamics",
            "",
            (
                "Mean of each γ over training (band: its min–max), one panel per site, one line per layer "
                f"(group `{first[0].spec.group}`, seed 0). For OR/ER the plotted γ is m·√d·α/‖α‖."
            ),
            "",
        ]
        lines += [f"![{arm}]({png})" for arm, png in dyn] + [""]

    ol, ores = overhead_section(groups, Path.cwd())
    lines += ol
    if ores:
        results["overhead"] = ores

    best = _read_json(study_dir / "best_lr.json")
    if best:
        results["best_lr"] = best

    (out / "README.md").write_text("\n".join(lines).rstrip() + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=1, default=_jsonable))
    _write_csv(out / "runs.csv", runs)
    return out / "README.md"


def _jsonable(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    return str(x)


CSV_FIELDS = [
    "group",
    "arm",
    "seed",
    "key",
    "status",
    "final_val_loss",
    "steps",
    "tokens",
    "wall_s",
    "tok_per_s",
    "params",
    "non_embedding_params",
    "active_non_embedding_params",
    "scale_vector_params",
    "model",
    "strategy",
    "optimizer",
    "schedule",
    "lr",
    "peak_rss_mib",
]


def _write_csv(path: Path, runs: list[Run]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in runs:
            w.writerow(
                {
                    **r.summary,
                    "group": r.spec.group,
                    "arm": r.spec.arm,
                    "seed": r.spec.seed,
                    "key": r.spec.key,
                    "status": r.status,
                    "lr": r.spec.overrides.get("optim.lr", ""),
                    "peak_rss_mib": r.resources.get("peak_rss_mib", ""),
                }
            )


# ------------------------------------------------------------------------------------- index and TensorBoard


def write_index(reports: dict[str, Path], out: Path) -> Path:
    """``OUT/README.md``: every study's claim verdicts in one place, read from the reports' results.json."""
    lines = [
        "# Study results",
        "",
        (
            "Generated by `scalevec report` from the run files. One folder per study; the "
            "verdicts below are copied from each study's `results.json`."
        ),
        "",
    ]
    for name, md in reports.items():
        res = json.loads((md.parent / "results.json").read_text())
        lines += [f"## [{name}]({os.path.relpath(md, out)})", ""]
        claims = res.get("claims", [])
        for c in claims:
            mean = c.get("mean")
            lines.append(
                f"- {c['verdict'].split(' (')[0].upper()}: {c['claim']} [{c['group']}: {c['arm']} − "
                f"{c['ref']} = {_f(mean, sign=True)} nats, "
                f"p = {_p(c['p'] if c.get('p') is not None else math.nan)}, "
                f"n = {c['n']}]"
            )
        if "best_lr" in res:
            lines += [
                f"- best LR of {s}: {fmt_lr(v['lr'])}" + (" (grid edge)" if v.get("at_grid_edge") else "")
                for s, v in res["best_lr"].items()
            ]
        if not claims and "best_lr" not in res:
            lines.append("- no finished comparison")
        lines.append("")
    path = out / "README.md"
    path.write_text("\n".join(lines))
    return path


def export_tensorboard(study_dir: Path, logdir: Path) -> int:
    """Every run's metrics as TensorBoard scalars, one TensorBoard run per study run (``group/arm/seed``)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError("--tensorboard needs the tensorboard package (pip install tensorboard)") from None
    _, runs = load_study(Path(study_dir))
    n = 0
    for r in runs:
        rows = r.metrics()
        if not rows:
            continue
        w = SummaryWriter(str(Path(logdir) / slug(r.spec.group) / slug(r.spec.arm) / f"seed{r.spec.seed}"))
        for row in rows:
            for k, v in row.items():
                if k not in ("step", "tokens") and isinstance(v, (int, float)):
                    w.add_scalar(k, v, row["step"])
        w.close()
        n += 1
    return n
