"""Markdown tables of a study report: claims with verdicts, each arm's optimum, the noise floor, the regime,
the compute multiplier, LR sweeps and overhead."""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np

from scalevec.study.grids import fmt_lr
from scalevec.study.loading import Run


def f(x: float | None, nd: int = 4, sign: bool = False) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "—"
    return f"{x:+.{nd}f}" if sign else f"{x:.{nd}f}"


def pv(p: float | None) -> str:
    if p is None or not math.isfinite(p):
        return "—"
    return f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"


def ci(c: list | None, nd: int = 4, sign: bool = True) -> str:
    if not c or c[0] is None or not all(math.isfinite(x) for x in c):
        return "—"
    return f"[{c[0]:+.{nd}f}, {c[1]:+.{nd}f}]" if sign else f"[{c[0]:.{nd}f}, {c[1]:.{nd}f}]"


def claims_table(rows: list[dict]) -> list[str]:
    lines = ["| verdict | claim | group | Δ (arm − ref) | 95% CI | p | p (Holm) | MDE | n | paper |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        extra = f" (τ² = {r['tau2']:.2g}, I² = {r['i2']:.0%})" if r.get("tau2") is not None and "i2" in r else ""
        lines.append(f"| **{r['verdict']}** | {r['claim']} | {r['group']}{extra} | {f(r['delta'], sign=True)} | "
                     f"{ci(r['ci95'])} | {pv(r['p'])} | {pv(r['p_holm'])} | {f(r['mde'])} | {r['n']} | "
                     f"{r['paper']} |")
    return lines


def optima_table(group: str, detail: dict, runs: list[Run]) -> list[str]:
    axis = next((r.spec.coords.get("axis") for r in runs if "axis" in r.spec.coords), "lr")
    lines = [f"### {group}", "", f"| arm | grid ({axis}) | fitted optimum | bootstrap 95% CI | inside grid | seeds |",
             "|---|---|---|---|---|---|"]
    for arm, o in detail["optima"].items():
        interval = "—" if o["lo"] is None else f"{fmt_lr(o['lo'])}–{fmt_lr(o['hi'])}"
        lines.append(f"| {arm} | {', '.join(fmt_lr(x) for x in o['grid'])} | {fmt_lr(o['lr'])} | {interval} | "
                     f"{'yes' if o['inside'] else '**no: widen the grid**'} | {o['seeds']} |")
    nz = detail["noise"]
    if nz.get("null_sd") is not None:
        lines += ["", (f"Null arm (baseline, other init seed, same data order): Δ = {f(nz['null_delta'], sign=True)}, "
                      f"sd of the paired difference {f(nz['null_sd'])}, MDE {f(nz['mde'])} over {nz['n']} seeds.")]
    else:
        lines += ["", "No null arm in this group: its claims use the study's pooled noise floor."]
    return [*lines, ""]


def multiplier_value(m: dict) -> str:
    """The multiplier, or its bound when unified's score lies outside the baseline's measured token ratios."""
    return f"{m['value']:.3f}×" if m["value"] is not None else m["bound"] or "—"


def multiplier_ci(m: dict) -> str:
    """The multiplier's interval; an end beyond the measured token ratios reads as its bound (">1.5")."""
    ends = [b or (f"{x:.3f}" if x is not None else None) for x, b in zip(m["ci95"], m.get("ci95_bounds", ["", ""]))]
    return "—" if None in ends else f"[{ends[0]}, {ends[1]}]"


def params_span(ns: list[int]) -> str:
    return "—" if not ns else f"{ns[0] / 1e3:.0f}k" if len(ns) == 1 or ns[-1] < 1.05 * ns[0] \
        else f"{ns[0] / 1e3:.0f}k–{ns[-1] / 1e3:.0f}k"


def answer_table(results: dict[str, dict]) -> list[str]:
    """Every claim of every study in one table: verdict, effect, the scale it was measured at, the paper's
    number; what a user asks first."""
    lines = ["| verdict | claim | group | Δ (arm − ref), 95% CI | p (Holm) | MDE | scale | the paper |",
             "|---|---|---|---|---|---|---|---|"]
    for study, res in results.items():
        reg = res.get("regime") or {}
        scale = f"{params_span(reg.get('non_embedding_params', []))} params, ≥ {f(reg.get('tokens_per_param'), 0)} " \
                "tokens/param"
        for c in res.get("claims", []):
            where = c["group"] if c["group"].startswith(study) else f"{study}: {c['group']}"
            lines.append(f"| **{c['verdict']}** | {c['claim']} | {where} | {f(c['delta'], sign=True)} "
                         f"{ci(c['ci95'])} | {pv(c['p_holm'])} | {f(c.get('mde'))} | {scale}, {c.get('n', '—')} seeds "
                         f"| {c.get('paper') or '—'} |")
        for m in res.get("multiplier", []):
            val = f"{multiplier_value(m)} {multiplier_ci(m)}"
            lines.append(f"| measured | compute multiplier of unified | {study}: {m['rung']} | {val} | — | — | "
                         f"{m.get('n_params') or '—'} params | 1.22–1.25× |")
    return lines


def regime_lines(reg: dict, noise: dict) -> list[str]:
    ns = ", ".join(f"{n / 1e3:.0f}k" for n in reg["non_embedding_params"]) or "—"
    lines = [(f"- Non-embedding parameters: {ns}; at least **{f(reg['tokens_per_param'], 1)} tokens per parameter**; "
             f"at most {f(reg['epochs'], 2)} epochs of the train split."),
             (f"- Score: mean of the last evaluations, each over the validation split ({reg['eval_tokens'] or '—'} "
             f"tokens evaluated); units: {noise['units']}.")]
    if noise.get("null_sd") is not None and math.isfinite(noise["null_sd"]):
        lines.append(f"- Noise floor (null arms, pooled): sd {f(noise['null_sd'])} of a paired difference; MDE "
                     f"{f(noise['mde'])} at p < {noise['alpha']} with {noise['power']:.0%} power for "
                     f"{noise['seeds']} seeds.")
    return [*lines, ""]


def multiplier_lines(mult: list[dict]) -> list[str]:
    if not mult:
        return []
    lines = ["## Compute multiplier", "",
             ("The baseline trains at several token budgets (each with its own schedule) at its fitted optimum LR; "
             "unified's multiplier is the token ratio at which the baseline reaches unified's score, interpolated "
             "in log tokens (bootstrap over seeds). Paper: 1.22–1.25×."), "",
             "| rung | N | multiplier | 95% CI | baseline ratios |", "|---|---|---|---|---|"]
    for m in mult:
        val = f"{m['value']:.3f}×" if m["value"] is not None else f"outside the range ({m['bound'] or '—'})"
        lines.append(f"| {m['rung']} | {m.get('n_params') or '—'} | {val} | {multiplier_ci(m)} | "
                     f"{', '.join(f'{r:.3g}' for r in m['ratios'])} |")
    return [*lines, "", "![loss vs compute](loss_vs_compute.png)", ""]


def sweep_table(group: str, runs: list[Run], best: dict) -> list[str]:
    cell: dict[tuple[str, float], list[float]] = defaultdict(list)
    for r in runs:
        if r.loss is not None:
            cell[(r.spec.coords["strategy"], r.spec.coords["x"])].append(r.loss)
    strategies = list(dict.fromkeys(r.spec.coords["strategy"] for r in runs))
    lrs = sorted({r.spec.coords["x"] for r in runs})
    lines = [f"### {group}", "", "Score per LR (mean over seeds; ∞: diverged); the optimum is a quadratic fit in log LR.",
             "", "| strategy | " + " | ".join(f"lr={fmt_lr(x)}" for x in lrs) + " | optimum |",
             "|---|" + "---|" * (len(lrs) + 1)]
    for s in strategies:
        cells = []
        for lr in lrs:
            v = cell.get((s, lr))
            m = float(np.mean(v)) if v else math.nan
            cells.append("—" if not v else "∞" if math.isinf(m) else f"{m:.4f}")
        b = best.get(s)
        edge = "" if not b or b["inside_grid"] else " (grid edge: widen the grid)"
        lines.append(f"| {s} | " + " | ".join(cells) + f" | {fmt_lr(b['lr']) if b else '—'}{edge} |")
    return [*lines, ""]


def overhead_lines(runs: list[Run]) -> tuple[list[str], dict]:
    """Throughput and peak memory of each arm relative to the baseline runs at the same grid point and seed."""
    ratios: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    index = {(r.spec.group, r.spec.coords.get("x"), r.spec.seed, r.spec.arm): r for r in runs if r.summary}
    for (g, x, seed, arm), r in index.items():
        b = index.get((g, x, seed, r.spec.baseline))
        if b is None or arm in (r.spec.baseline, "null") or r.spec.baseline is None:
            continue
        ratios[arm]["step_time"].append(b.summary["tok_per_s"] / r.summary["tok_per_s"])
        for key in ("peak_cuda_mib", "peak_rss_mib"):
            if r.resources.get(key) and b.resources.get(key):
                ratios[arm][key].append(r.resources[key] / b.resources[key])
                break
    if not ratios:
        return [], {}
    lines = ["## Overhead", "", ("Ratios to the same-seed baseline run at the same grid point (geometric mean over "
             "pairs); step time from each run's mean throughput, evaluation included; runs that shared cores "
             "give indicative ratios only. The dedicated benchmark is `docs/performance.md`."), "",
             "| arm | pairs | step time | peak memory |", "|---|---|---|---|"]
    out = {}
    for arm, d in ratios.items():
        gm = {k: float(np.exp(np.mean(np.log(v)))) for k, v in d.items() if v}
        mem = gm.get("peak_cuda_mib", gm.get("peak_rss_mib"))
        lines.append(f"| {arm} | {len(d['step_time'])} | {gm['step_time']:.3f}× | {f(mem, 3) + '×' if mem else '—'} |")
        out[arm] = gm
    return [*lines, ""], out
