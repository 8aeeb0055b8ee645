"""Studies: the grids' regime, the null arm, statistics, tuning, the report's fields, and the whole pipeline on
the smoke budget."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as sps

from scalevec.cli import main as cli_main
from scalevec.study import stats, tables
from scalevec.study.budgets import BUDGETS, knobs_for
from scalevec.study.estimate import TimeModel, calibrate
from scalevec.study.grids import NULL, STUDIES, kv
from scalevec.study.report import ANSWER_BEGIN, ANSWER_END, write_answer, write_index, write_report
from scalevec.study.runner import Runner
from scalevec.study.spec import RunSpec
from scalevec.study.tuning import fit_optimum, loss_at, token_multiplier
from scalevec.typed_config import ConfigError

TRAIN_SPLIT = 4_553_215  # byte-level Shakespeare's train split (tokens), from its prepared meta.json


def specs_of(name: str, budget: str = "cpu", lookup=lambda sp: None, **knobs) -> list[RunSpec]:
    k = knobs_for(name, budget)
    for key, v in knobs.items():
        setattr(k, key, v)
    out = []
    for _, stage in STUDIES[name].stages[:1]:
        out += stage(k, lookup)
    return out


# ------------------------------------------------------------------------------------------- grids, regime


@pytest.mark.parametrize("name", ["necessity", "improvements", "weight-decay", "unified"])
def test_cpu_regime_tokens_epochs_schedule_and_grids(name):
    specs = specs_of(name)
    floor = 20 if name == "unified" else 30
    for sp in specs:
        ov = sp.overrides
        tokens = int(ov["train.steps"]) * int(ov["train.batch_size"]) * int(ov["train.seq_len"])
        n = _params(ov)  # the arm's own count: unified's extra gains must not put it below the floor
        assert tokens / n >= floor and tokens <= 4 * TRAIN_SPLIT, sp.key
        assert float(ov["schedule.min_lr_ratio"]) <= 0.01 and float(ov["schedule.warmup"]) == pytest.approx(0.05)
        assert int(ov["train.steps"]) % int(ov["train.ckpt_every"]) == 0  # scored checkpoints end at the last step
    for g in {sp.group for sp in specs}:
        for arm in {sp.arm for sp in specs if sp.group == g} - {NULL}:
            points = {sp.coords["x"] for sp in specs if sp.group == g and sp.arm == arm}
            seeds = {(sp.coords["x"], sp.seed) for sp in specs if sp.group == g and sp.arm == arm}
            assert len(points) >= 3 and len(seeds) == len(points) * knobs_for(name, "cpu").seeds  # all seeds


def _params(ov):
    from scalevec.study.grids import non_embedding_params

    return non_embedding_params({k: v for k, v in ov.items() if k.startswith(("model.", "scale."))})


def test_null_arm_differs_from_its_baseline_only_in_the_init_seed():
    specs = specs_of("improvements", seeds=3)
    for null in (sp for sp in specs if sp.arm == NULL):
        base = next(sp for sp in specs if sp.arm == "baseline" and sp.seed == null.seed
                    and sp.coords["x"] == null.coords["x"])
        a, b = kv(null.config_overrides()), kv(base.config_overrides())
        assert a["data.seed"] == b["data.seed"] and a["train.seed"] != b["train.seed"]
        assert {k: v for k, v in a.items() if k != "train.seed"} == {k: v for k, v in b.items() if k != "train.seed"}
    arms = {sp.arm for sp in specs if sp.seed == 0}
    assert arms == {"baseline", "hg", "dp", "dnp", "or", "er", NULL}


def test_weight_decay_fixes_eta_lambda_t_and_muon_tunes_the_gain_lr():
    k = knobs_for("weight-decay", "cpu")
    for sp in specs_of("weight-decay"):
        ov = sp.overrides
        horizon = float(ov["optim.lr"]) * float(ov["optim.weight_decay"]) * int(ov["train.steps"])
        assert horizon == pytest.approx(k.decay_horizon) and 2 <= horizon <= 4
        assert ov["model.style"] == "gemma"
    muon = [sp for sp in specs_of("unified") if sp.overrides["optim.name"] == "muon"]
    assert muon and len({sp.overrides["optim.lr_mult"] for sp in muon if sp.arm == "unified"}) >= 3
    assert len({sp.overrides["optim.lr"] for sp in muon if sp.arm == "unified"}) == 1


def test_unified_ladder_spans_4x_and_budgets_stage_uses_the_fitted_optimum():
    k = knobs_for("unified", "cpu")
    grid = specs_of("unified")
    first = [sp for sp in grid if sp.coords["setup"] == k.setups[0]]
    ns = sorted({sp.coords["n_params"] for sp in first})
    assert len(ns) >= 3 and ns[-1] / ns[0] >= 4

    def lookup(sp):  # every arm's optimum at 2x its grid centre
        return 2.0 + (math.log(sp.coords["x"] / (2 * k.lr))) ** 2

    budgets = STUDIES["unified"].stages[1][1](k, lookup)
    assert {sp.coords["ratio"] for sp in budgets if sp.coords["strategy"] == "baseline"} == set(k.token_ratios)
    assert all(float(sp.overrides["optim.lr"]) == pytest.approx(2 * k.lr, rel=1e-6) for sp in budgets)
    small = k.setup_sizes[k.setups[0]][0]
    steps = {sp.coords["ratio"]: int(sp.overrides["train.steps"]) for sp in budgets
             if sp.coords["size"] == small and sp.coords["strategy"] == "baseline"}
    assert steps[1.5] == pytest.approx(1.5 * steps[1.0], rel=0.1)
    ones = {sp.key for sp in budgets if sp.coords["ratio"] == 1.0}
    assert ones and ones <= {sp.key for sp in grid}  # ratio 1 is the grid run itself, not trained again


def test_knobs_are_typed_and_strict():
    k = knobs_for("improvements", "cpu")
    k.set("lr_factors", "[0.25, 1.0, 4.0]")
    k.set("seeds", "7")
    assert k.lr_factors == [0.25, 1.0, 4.0] and k.seeds == 7
    with pytest.raises(ConfigError):
        k.set("seedz", "3")
    with pytest.raises(ConfigError):
        knobs_for("nope", "cpu")
    k.lr_factors = [0.5, 2.0]
    with pytest.raises(ConfigError, match="must contain 1.0"):
        STUDIES["improvements"].stages[0][1](k, lambda sp: None)


def test_runner_scores_and_skips_finished_runs_and_records_failures(tmp_path):
    specs = specs_of("improvements", "smoke")[:2]
    runner = Runner(tmp_path, jobs=2, python="/bin/false", log=lambda *_: None)  # any real launch fails
    for sp in specs:
        d = runner.run_dir(sp)
        d.mkdir(parents=True)
        (d / "summary.json").write_text(json.dumps({"final_val_loss": 2.5}))
    assert runner.status(specs[0]) == "unscored" and "--resume" not in runner.command(specs[0])
    for sp in specs:
        (runner.run_dir(sp) / "score.json").write_text(json.dumps({"score": 2.4}))
    runner.execute(specs)  # nothing to launch: no failure
    assert all(runner.status(sp) == "done" and runner.lookup(sp) == 2.4 for sp in specs)
    extra = specs_of("improvements", "smoke")[5]
    with pytest.raises(ConfigError, match="failed"):
        runner.execute([*specs, extra])
    assert runner.status(extra) == "failed" and runner.lookup(extra) is None


@pytest.mark.parametrize("grid", sorted((Path(__file__).parents[1] / "configs" / "studies").glob("*.toml")),
                         ids=lambda p: p.name)
def test_committed_grid_files_build_their_runs(grid):
    k = knobs_for("unified", "cpu")
    k.load(grid)
    specs = STUDIES["unified"].stages[0][1](k, lambda sp: None)
    assert specs and {sp.arm for sp in specs} == {"baseline", "unified", NULL}


# ------------------------------------------------------------------------------------------------- statistics


def test_paired_ci_mde_holm_and_verdicts():
    rng = np.random.default_rng(0)
    base = {i: 2.0 + rng.normal(0, 0.05) for i in range(6)}
    arm = {i: base[i] - 0.01 + rng.normal(0, 0.002) for i in range(6)}
    p = stats.paired(arm, base)
    d = np.array([arm[i] - base[i] for i in range(6)])
    half = sps.t.ppf(0.975, 5) * d.std(ddof=1) / math.sqrt(6)
    assert (p.lo, p.hi) == pytest.approx((d.mean() - half, d.mean() + half))
    assert p.p == pytest.approx(sps.ttest_1samp(d, 0).pvalue)
    assert stats.mde(0.01, 6) == pytest.approx((sps.t.ppf(0.975, 5) + sps.t.ppf(0.8, 5)) * 0.01 / math.sqrt(6))
    assert stats.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert stats.verdict(p.mean, p.lo, p.hi, 0.001, -1, 0.1) == stats.SUPPORTED
    assert stats.verdict(p.mean, p.lo, p.hi, 0.001, +1, 0.1) == stats.CONTRADICTED
    assert stats.verdict(0.001, -0.002, 0.004, 0.5, -1, 0.005) == stats.BOUNDED
    assert stats.verdict(0.001, -0.002, 0.009, 0.5, -1, 0.005) == stats.NOT_RESOLVED


def test_random_effects_pooling_reports_heterogeneity():
    same = stats.random_effects([-0.01, -0.011, -0.009], [0.002, 0.002, 0.002])
    assert same.tau2 == 0 and same.i2 == 0 and same.mean == pytest.approx(-0.01) and same.p < 0.05
    half = sps.t.ppf(0.975, 2) * math.sqrt(0.002**2 / 3)  # HKSJ: t with k-1 df, never narrower than DL
    assert (same.lo, same.hi) == pytest.approx((-0.01 - half, -0.01 + half))
    mixed = stats.random_effects([-0.05, 0.0, 0.05], [0.002, 0.002, 0.002])
    assert mixed.tau2 > 0.001 and mixed.i2 > 0.9 and mixed.p > 0.05  # fixed-effect pooling would be wrong here
    w = 1 / 0.002**2
    q = sum(w * (y - 0.0) ** 2 for y in (-0.05, 0.0, 0.05))
    assert mixed.q == pytest.approx(q) and mixed.tau2 == pytest.approx((q - 2) / (3 * w - 3 * w**2 / (3 * w)))


def test_slope_test_detects_a_widening_gap():
    steps = list(range(100, 900, 100))
    rng = np.random.default_rng(1)
    widening = {s: [-1e-5 * t + rng.normal(0, 1e-4) for t in steps] for s in range(4)}
    flat = {s: [rng.normal(0, 1e-4) for _ in steps] for s in range(4)}
    w = stats.slope_test(steps, widening)
    assert w.slope == pytest.approx(-0.01, rel=0.1) and w.p < 0.01 and w.hi < 0
    assert stats.slope_test(steps, flat).p > 0.01


def test_quadratic_optimum_and_token_multiplier_recover_known_values():
    lrs = [1e-3, 2e-3, 4e-3, 8e-3]
    best = 3e-3
    losses = {(lr, s): 2.0 + 0.05 * math.log(lr / best) ** 2 + 0.01 * s for lr in lrs for s in range(4)}
    opt = fit_optimum(losses)
    assert opt.lr == pytest.approx(best, rel=1e-6) and opt.inside and opt.lo <= best <= opt.hi
    assert loss_at(losses, best) == pytest.approx({s: 2.0 + 0.01 * s for s in range(4)})
    edge = fit_optimum({(lr, 0): -math.log(lr) for lr in lrs})
    assert not edge.inside and edge.lr == pytest.approx(8e-3)
    # baseline: loss falls 0.1 per doubling of tokens; the arm matches the baseline at 1.3x
    base = {r: {s: 2.0 - 0.1 * math.log2(r) + 0.001 * s for s in range(4)} for r in (1.0, 1.25, 1.5)}
    arm = {s: 2.0 - 0.1 * math.log2(1.3) + 0.001 * s for s in range(4)}
    m = token_multiplier(base, arm)
    assert m.value == pytest.approx(1.3, rel=1e-6) and m.lo <= 1.3 <= m.hi and m.bound == ""
    assert token_multiplier(base, {s: 1.0 for s in range(4)}).bound == ">1.5"
    worse = token_multiplier(base, {s: 3.0 for s in range(4)})
    assert worse.bound == "<1" and math.isnan(worse.value) and (worse.lo_bound, worse.hi_bound) == ("<1", "<1")
    # near the top of the range some bootstrap replicates fall beyond it: the interval says so, not drops them
    rng = np.random.default_rng(0)
    edge = token_multiplier(base, {s: 2.0 - 0.1 * math.log2(1.48) + rng.normal(0, 0.02) for s in range(4)})
    assert edge.hi_bound == ">1.5" and edge.lo_bound == "" and 1 < edge.lo < 1.5
    assert tables.multiplier_ci({"ci95": [edge.lo, None], "ci95_bounds": ["", ">1.5"]}).endswith(", >1.5]")


def test_time_estimate_calibrates_on_finished_runs(tmp_path):
    truth = TimeModel(warm=10.0, cold=10.0, a=5e-6, b=1e-10, source="")
    shapes = [(1e6, 3e4), (2e6, 7e4), (4e6, 1.3e5), (4e6, 2e5), (1e6, 1.3e5), (3e6, 3e4)]
    for i, (tokens, n) in enumerate(shapes):
        d = tmp_path / "runs" / f"r{i}"
        d.mkdir(parents=True)
        first = {"step": 10, "tokens": 40960, "tok_per_s": 40960 / truth.warm}
        (d / "metrics.jsonl").write_text(json.dumps(first) + "\n")
        (d / "summary.json").write_text(json.dumps({"tokens": tokens + 40960, "non_embedding_params": n,
                                                    "wall_s": 0}))
        (d / "resources.json").write_text(json.dumps({"runner_s": truth.seconds(tokens, n)}))
        (d / "score.json").write_text(json.dumps({"evals": [], "eval_tokens": 0}))
    model = calibrate(tmp_path)
    assert "calibrated on 6" in model.source and model.warm == pytest.approx(truth.warm)
    for tokens, n in ((5e6, 1e5), (5e5, 4e4)):
        assert model.seconds(tokens, n) == pytest.approx(truth.seconds(tokens, n), rel=0.01)
    assert "measured defaults" in calibrate(tmp_path / "empty").source
    # a study's first run of each graph compiles cold, the rest warm
    from scalevec.study.estimate import study_seconds

    specs = specs_of("necessity", "smoke")
    cold = TimeModel(warm=0.0, cold=100.0, a=0.0, b=0.0, source="")
    assert study_seconds(specs, cold) == pytest.approx(200.0)  # two graphs: baseline (and its null), no_scale


# ----------------------------------------------------------------------------------------------------- report


def fake_run(d: Path, loss: float, n_params: int = 10_000, tokens: int = 100_000, curve=None) -> None:
    d.mkdir(parents=True)
    rows = []
    for i, step in enumerate((10, 20, 30, 40)):
        val = curve[i] if curve else loss + 1.0 / step
        rows.append({"step": step, "tokens": step * 1000, "train_loss": val})
        rows.append({"step": step, "tokens": step * 1000, "val_loss": val,
                     "gamma/blocks.0.attn.q.in/mean": 1 + step / 100, "gamma/blocks.0.attn.q.in/std": 0.1,
                     "gamma/blocks.1.attn.q.in/mean": 1.0, "gamma/final.in/mean": 1.0})
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "summary.json").write_text(json.dumps({
        "final_val_loss": loss, "params": 2 * n_params, "non_embedding_params": n_params, "tokens": tokens,
        "steps": 40, "wall_s": 1.0, "tok_per_s": 1000.0, "strategy": "x", "model": "tiny", "optimizer": "adamw",
        "schedule": "wsd", "device": "cpu", "scale_vector_params": 10}))
    (d / "score.json").write_text(json.dumps({"score": loss, "evals": [], "eval_tokens": 5000,
                                              "train_split_tokens": 400_000}))
    (d / "resources.json").write_text(json.dumps({"peak_rss_mib": 400.0}))


def test_report_fields_from_fake_unified_runs(tmp_path):
    """Two rungs with a known effect: unified 0.02 lower at every LR, a flat null arm, and a baseline whose loss
    falls 0.1 nats per doubling of tokens, so the multiplier is 2^0.2."""
    entries = []

    def add(sp, loss, **kw):
        fake_run(tmp_path / "runs" / sp.key, loss, **kw)
        entries.append({**sp.to_json(), "run_dir": f"../runs/{sp.key}"})

    rng = np.random.default_rng(0)
    for size, n in (("a", 10_000), ("b", 40_000)):
        group, setup = f"dense/adamw/wsd {size}", "dense/adamw/wsd"
        for seed in range(4):
            noise = rng.normal(0, 0.003)
            for arm, shift in (("baseline", 0.0), ("unified", -0.02)):
                for x in (1e-3, 2e-3, 4e-3):
                    c = {"setup": setup, "size": size, "x": x, "axis": "lr", "n_params": n}
                    ov = {"scale.strategy": arm, "optim.lr": str(x), "size": size, "train.steps": "40"}
                    loss = 2.0 + shift + 0.02 * math.log(x / 2e-3) ** 2 + noise + rng.normal(0, 0.001)
                    curve = [loss + 0.1 + shift * t / 40 for t in (10, 20, 30, 40)]
                    add(RunSpec(arm, group, seed, ov, "baseline", "grid", c), loss, n_params=n, curve=curve)
                    if arm == "baseline" and x == 2e-3:
                        add(RunSpec(NULL, group, seed, ov, "baseline", "grid", {**c, "null": True}, seed + 9),
                            loss + rng.normal(0, 0.001), n_params=n)
            for arm, ratio in (("baseline", 1.0), ("baseline", 1.25), ("baseline", 1.5), ("unified", 1.0)):
                c = {"setup": setup, "size": size, "ratio": ratio, "strategy": arm, "n_params": n}
                loss = 2.0 + noise - 0.1 * math.log2(ratio) - (0.02 if arm == "unified" else 0)
                add(RunSpec(f"{arm} ×{ratio}", f"{group} budgets", seed,
                            {"r": str(ratio), "s": arm, "z": size, "train.steps": str(int(40 * ratio))},
                            None, "budget", c), loss, n_params=n, tokens=int(1e5 * ratio))
    study = tmp_path / "unified"
    study.mkdir()
    (study / "study.json").write_text(json.dumps({"study": "unified", "budget": "cpu", "knobs": {}, "runs": entries}))
    md = write_report(study, tmp_path / "out")
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert set(res["regime"]) >= {"non_embedding_params", "tokens_per_param", "epochs", "eval_tokens", "lr_grid"}
    assert set(res["noise"]) >= {"null_sd", "mde", "units"} and "nats per byte" in res["noise"]["units"]
    rows = {c["group"]: c for c in res["claims"]}
    assert {"claim", "group", "delta", "ci95", "p", "p_holm", "verdict"} <= set(rows["dense/adamw/wsd a · own optimum"])
    for g in ("dense/adamw/wsd a · own optimum", "dense/adamw/wsd b · same LR"):
        assert rows[g]["delta"] == pytest.approx(-0.02, abs=0.003) and rows[g]["verdict"] == "SUPPORTED"
    pooled = rows["pooled over 2 groups (random effects) · own optimum"]
    assert pooled["delta"] == pytest.approx(-0.02, abs=0.003) and pooled["i2"] is not None
    assert all(r["p_holm"] >= r["p"] for r in res["claims"])
    for m in res["multiplier"]:
        assert m["value"] == pytest.approx(2 ** 0.2, rel=0.02) and m["ci95"][0] <= m["value"] <= m["ci95"][1]
    assert res["wsd"]["dense/adamw/wsd a"]["slope"]["slope"] < 0
    text = md.read_text()
    assert "SUPPORTED" in text and "Compute multiplier" in text and "τ²" in text
    for png in ("claims.png", "lr_grids.png", "loss_curves.png", "gamma_baseline.png", "wsd_delta.png",
                "loss_vs_compute.png"):
        assert (tmp_path / "out" / png).stat().st_size > 1000, png
    index = write_index({"unified": md}, tmp_path).read_text()
    assert "SUPPORTED: Unified lowers the loss" in index
    # the table of every claim: one row per claim and one per multiplier, each naming its study and group
    table = [ln for ln in index.split("## [unified]")[0].splitlines() if ln.startswith("| **") or "| measured |" in ln]
    assert len(table) == len(res["claims"]) + len(res["multiplier"]) and all("unified: " in ln for ln in table)

    doc = tmp_path / "studies.md"
    doc.write_text(f"# Intro\n\n{ANSWER_BEGIN}\nstale row\n{ANSWER_END}\n\nhand-written tail\n")
    write_answer({"unified": md}, doc)
    text = doc.read_text()
    assert "stale row" not in text and text.startswith("# Intro") and text.endswith("hand-written tail\n")
    assert text.count("| **SUPPORTED** |") == sum(c["verdict"] == "SUPPORTED" for c in res["claims"]) > 0


def test_report_refuses_a_doc_without_an_answer_block_before_writing(tmp_path, capsys):
    doc = tmp_path / "studies.md"
    doc.write_text("# no markers here\n")
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "study.json").write_text(json.dumps({"study": "necessity", "budget": "cpu", "knobs": {},
                                                           "runs": []}))
    assert cli_main(["report", str(tmp_path / "s"), "--out", str(tmp_path / "out"), "--answer-into", str(doc)]) != 0
    assert "--answer-into" in capsys.readouterr().err and not (tmp_path / "out").exists()
    assert doc.read_text() == "# no markers here\n"


# --------------------------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_smoke_budget_runs_the_whole_pipeline(tmp_path, capsys):
    """grid -> runs (real training and scoring) -> report -> results.json, on the smoke budget."""
    out = tmp_path / "study"
    argv = ["study", "necessity", "--budget", "smoke", "--out", str(out), "--report"]
    assert cli_main(argv) == 0
    report = out / "necessity" / "report"
    res = json.loads((report / "results.json").read_text())
    reg, noise = res["regime"], res["noise"]
    assert reg["tokens_per_param"] > 0 and reg["epochs"] > 0 and reg["eval_tokens"] > 0
    assert set(reg["lr_grid"]) == {"baseline", "no_scale"} and all(len(v) == 3 for v in reg["lr_grid"].values())
    assert noise["null_sd"] > 0 and noise["mde"] > 0 and noise["units"]
    assert [c["group"] for c in res["claims"]] == ["necessity · own optimum", "necessity · same LR"]
    for c in res["claims"]:
        assert c["verdict"] in ("SUPPORTED", "CONTRADICTED", "BOUNDED", "NOT RESOLVED")
        assert c["ci95"][0] <= c["delta"] <= c["ci95"][1] and c["p"] <= c["p_holm"] <= 1
    run = next((out / "runs").glob("baseline-*"))
    scored = json.loads((run / "score.json").read_text())
    assert len(scored["evals"]) == 3 and scored["evals"][-1]["step"] == BUDGETS["smoke"]["_all"]["steps"]
    assert any(k.startswith("gamma/blocks.0.attn.in/") for ln in (run / "metrics.jsonl").read_text().splitlines()
               for k in json.loads(ln))
    capsys.readouterr()
    assert cli_main(argv) == 0  # a rerun skips every finished run
    assert "14 finished earlier, 0 to run" in capsys.readouterr().out


def test_demo_prints_the_committed_verdict_or_says_there_is_none(tmp_path):
    from scalevec.demo import committed_verdict

    assert committed_verdict(tmp_path).startswith("no committed verdict")
    (tmp_path / "unified").mkdir()
    row = {"claim": "Unified lowers the loss", "group": "pooled over 2 groups (random effects) · own optimum",
           "delta": -0.012, "ci95": [-0.02, -0.004], "p": 0.001, "p_holm": 0.004, "verdict": "SUPPORTED"}
    other = {**row, "group": "dense/adamw/cosine 33k · same LR", "verdict": "NOT RESOLVED"}
    (tmp_path / "unified" / "results.json").write_text(json.dumps(
        {"budget": "cpu", "regime": {}, "claims": [other, row]}))
    text = committed_verdict(tmp_path)
    assert text.startswith("SUPPORTED: unified − baseline = -0.0120, 95% CI [-0.0200, -0.0040]") and "cpu" in text


def test_demo_falls_back_to_the_earlier_designs_verdict_and_says_so(tmp_path):
    from scalevec.demo import committed_verdict

    (tmp_path / "earlier" / "unified").mkdir(parents=True)
    row = {"claim": "Unified lowers the loss", "group": "pooled", "mean": 0.01, "verdict": "not resolved (p 0.3)"}
    (tmp_path / "earlier" / "unified" / "results.json").write_text(json.dumps({"budget": "cpu", "claims": [row]}))
    text = committed_verdict(tmp_path)
    assert text.startswith("NOT RESOLVED: unified − baseline = +0.0100") and "earlier study design" in text
