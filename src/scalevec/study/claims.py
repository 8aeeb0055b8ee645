"""From runs to verdicts: each arm's optimum, the null arm's noise floor, every claim at the arm's own optimum
and at the baseline's ("same LR"), random-effects pooling across groups, Holm's correction over the study,
the regime the runs trained in, and the unified study's compute multiplier and WSD slope."""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
from scipy import stats as sps

from scalevec.study import stats
from scalevec.study.budgets import UNITS
from scalevec.study.grids import NULL, Study
from scalevec.study.loading import Run, arms_in_order, by_seed, grid, groups_of
from scalevec.study.tuning import fit_optimum, loss_at, token_multiplier

MODES = ("own optimum", "same LR")


def grid_groups(runs: list[Run]) -> dict[str, list[Run]]:
    return {g: rs for g, rs in groups_of(runs).items() if rs[0].spec.stage == "grid"}


def optima(runs: list[Run]) -> dict[str, dict]:
    """Per arm of a grid group: the fitted optimum (``tuning.Optimum``), the null arm left out."""
    out = {}
    for arm in arms_in_order(runs):
        if arm != NULL:
            opt = fit_optimum(grid(runs, arm))
            if opt is not None:
                out[arm] = opt
    return out


def noise(runs: list[Run]) -> dict:
    """The null arm against the baseline at the same grid point: the spread of a paired difference between
    two arms that differ in nothing that matters."""
    null = [r for r in runs if r.spec.arm == NULL]
    if not null:
        return {"n": 0, "null_sd": None, "mde": None}
    x, base = null[0].spec.coords["x"], null[0].spec.baseline
    ref = {r.spec.seed: r.loss for r in runs if r.spec.arm == base and r.spec.coords.get("x") == x
           and r.loss is not None}
    pr = stats.paired(by_seed(runs, NULL), ref)
    return {"n": pr.n, "null_sd": pr.sd, "null_delta": pr.mean, "mde": stats.mde(pr.sd, pr.n)}


def _row(claim, group: str, pr: stats.Paired, bound: float, **extra) -> dict:
    return {"claim": claim.text, "group": group, "arm": claim.arm, "ref": claim.ref, "sign": claim.sign,
            "paper": claim.paper, "delta": pr.mean, "ci95": [pr.lo, pr.hi], "p": pr.p, "n": pr.n,
            "se": pr.se, "mde": bound, **extra}


def claim_rows(study: Study, runs: list[Run]) -> tuple[list[dict], dict]:
    """Every (claim, group, mode) row with its verdict, and the per-group optima and noise."""
    rows: list[dict] = []
    groups = grid_groups(runs)
    fits = {g: optima(rs) for g, rs in groups.items()}
    detail = {g: {"optima": {a: o.as_dict() for a, o in fits[g].items()}, "noise": noise(rs)}
              for g, rs in groups.items()}
    floor = study_noise(detail)  # for groups without a null arm of their own
    for g, rs in groups.items():
        opt, nz = fits[g], detail[g]["noise"]
        if nz.get("null_sd") is None:
            nz = {"n": floor["seeds"], "null_sd": floor["null_sd"], "mde": floor["mde"], "pooled": True}
        base = rs[0].spec.baseline
        for c in study.claims:
            if c.arm not in opt or c.ref not in opt or base not in opt:
                continue
            for mode in MODES:
                lr_arm = opt[c.arm].lr if mode == MODES[0] else opt[base].lr
                lr_ref = opt[c.ref].lr if mode == MODES[0] else opt[base].lr
                pr = stats.paired(loss_at(grid(rs, c.arm), lr_arm), loss_at(grid(rs, c.ref), lr_ref))
                mde = nz["mde"] if nz["mde"] is not None and math.isfinite(nz["mde"]) else math.nan
                rows.append(_row(c, f"{g} · {mode}", pr, mde,
                                 mode=mode, at={c.arm: lr_arm, c.ref: lr_ref}, null_se=_null_se(nz)))
    for c in study.claims:  # across groups: random effects, never one pooled sample
        for mode in MODES:
            mine = [r for r in rows if r["claim"] == c.text and r["mode"] == mode and r["arm"] == c.arm
                    and r["ref"] == c.ref]
            if len(mine) < 2:
                continue
            pooled = stats.random_effects([r["delta"] for r in mine], [r["se"] for r in mine])
            inv = [1 / r["null_se"] ** 2 for r in mine if r["null_se"] and math.isfinite(r["null_se"])]
            z = float(sps.norm.ppf(1 - stats.ALPHA / 2) + sps.norm.ppf(stats.POWER))
            bound = z / math.sqrt(sum(inv)) if inv else math.nan
            pr = stats.Paired(sum(r["n"] for r in mine), pooled.mean, math.nan, pooled.lo, pooled.hi,
                              math.nan, pooled.p)
            rows.append(_row(c, f"pooled over {pooled.k} groups (random effects) · {mode}", pr, bound,
                             mode=mode, tau2=pooled.tau2, i2=pooled.i2, q=pooled.q))
    for r, ph in zip(rows, stats.holm([r["p"] if r["p"] is not None else math.nan for r in rows])):
        r["p_holm"] = ph
        lo, hi = r["ci95"]
        r["verdict"] = stats.verdict(r["delta"], lo, hi, ph, r["sign"], r["mde"])
    return rows, detail


def _null_se(nz: dict) -> float:
    sd, n = nz.get("null_sd"), nz.get("n", 0)
    return sd / math.sqrt(n) if sd is not None and n > 1 and math.isfinite(sd) else math.nan


def study_noise(detail: dict) -> dict:
    """One noise floor for the study: the null arms' variances pooled over groups."""
    own = [d["noise"] for d in detail.values() if d["noise"].get("null_sd") is not None
           and math.isfinite(d["noise"]["null_sd"])]
    sds, ns = [nz["null_sd"] for nz in own], [nz["n"] for nz in own]
    sd = math.sqrt(float(np.mean(np.square(sds)))) if sds else math.nan
    n = min(ns) if ns else 0
    return {"null_sd": sd, "mde": stats.mde(sd, n), "units": UNITS, "seeds": n, "alpha": stats.ALPHA,
            "power": stats.POWER,
            "by_group": {g: d["noise"] for g, d in detail.items()}}


def regime(runs: list[Run]) -> dict:
    done = [r for r in runs if r.summary]
    ns = sorted({int(r.n_params) for r in done if math.isfinite(r.n_params)})
    tpp = [r.summary["tokens"] / r.n_params for r in done if r.n_params]
    epochs = [r.summary["tokens"] / r.scored["train_split_tokens"] for r in done
              if r.scored.get("train_split_tokens")]
    lr_grid: dict = defaultdict(dict)
    for g, rs in grid_groups(runs).items():
        for arm in arms_in_order(rs):
            if arm != NULL:
                lr_grid[g][arm] = sorted({r.spec.coords["x"] for r in rs if r.spec.arm == arm})
    flat = next(iter(lr_grid.values())) if len(lr_grid) == 1 else dict(lr_grid)
    return {"non_embedding_params": ns, "tokens_per_param": min(tpp) if tpp else None,
            "epochs": max(epochs) if epochs else None,
            "eval_tokens": max((r.scored.get("eval_tokens", 0) for r in done), default=None) or None,
            "lr_grid": flat, "tuned": next((r.spec.coords.get("axis") for r in runs if "axis" in r.spec.coords),
                                            None)}


def multipliers(runs: list[Run]) -> list[dict]:
    """Per rung of the budget stage: the token ratio at which the baseline reaches unified's score."""
    out = []
    for g, rs in groups_of(runs).items():
        if rs[0].spec.stage != "budget":
            continue
        base: dict[float, dict[int, float]] = defaultdict(dict)
        arm: dict[int, float] = {}
        steps = {r.spec.coords["ratio"]: int(r.spec.overrides["train.steps"]) for r in rs}
        for r in rs:
            if r.loss is None:
                continue
            if r.spec.coords["strategy"] == "baseline":  # the ratio actually trained (steps are rounded)
                base[steps[r.spec.coords["ratio"]] / steps[1.0]][r.spec.seed] = r.loss
            elif r.spec.coords["ratio"] == 1.0:
                arm[r.spec.seed] = r.loss
        m = token_multiplier(dict(base), arm).as_dict()
        # an interval end outside the measured ratios is null in ci95 and spelled in ci95_bounds (">1.5", "<1")
        out.append({"rung": g.removesuffix(" budgets"), "value": m["value"],
                    "ci95": [None if m["lo_bound"] else m["lo"], None if m["hi_bound"] else m["hi"]],
                    "ci95_bounds": [m["lo_bound"], m["hi_bound"]], "bound": m["bound"], "ratios": m["ratios"],
                    "n_params": rs[0].spec.coords.get("n_params")})
    return out


def wsd_deltas(runs: list[Run]) -> dict[str, dict]:
    """WSD groups: unified − baseline per periodic evaluation, each arm at its grid point nearest its optimum;
    the slope over the stable phase (after warm-up, before the decay) tested across seeds."""
    out = {}
    for g, rs in grid_groups(runs).items():
        if "/wsd" not in g:
            continue
        opt = optima(rs)
        if "unified" not in opt or "baseline" not in opt:
            continue
        curves = {}
        for arm in ("baseline", "unified"):
            xs = sorted({r.spec.coords["x"] for r in rs if r.spec.arm == arm})
            near = min(xs, key=lambda x: abs(math.log(x / opt[arm].lr)))
            curves[arm] = {r.spec.seed: {m["step"]: m["val_loss"] for m in r.metrics() if "val_loss" in m}
                           for r in rs if r.spec.arm == arm and r.spec.coords["x"] == near and r.status == "done"}
        seeds = sorted(set(curves["baseline"]) & set(curves["unified"]))
        if not seeds:
            continue
        steps = sorted(set.intersection(*(set(curves[a][s]) for a in curves for s in seeds)))
        d = {s: [curves["unified"][s][t] - curves["baseline"][s][t] for t in steps] for s in seeds}
        ov = rs[0].spec.overrides
        total = int(ov.get("train.steps", max(steps)))
        warm = float(ov.get("schedule.warmup", 0.05))
        warm_steps = warm * total if warm < 1 else warm
        stable_end = (1 - float(ov.get("schedule.decay_fraction", 0.2))) * total
        idx = [i for i, t in enumerate(steps) if warm_steps < t <= stable_end]
        slope = stats.slope_test([steps[i] for i in idx], {s: [v[i] for i in idx] for s, v in d.items()})
        out[g] = {"steps": steps, "deltas": d, "stable": [steps[i] for i in idx], "slope": slope.as_dict()}
    return out
