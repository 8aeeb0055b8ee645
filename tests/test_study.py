"""Studies: paired grids, resumable runner, paired statistics, scaling fits, report, a real micro-study."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from scalevec.cli import main as cli_main
from scalevec.study.grids import STUDIES, best_lrs, knobs_for
from scalevec.study.report import write_index, write_report
from scalevec.study.runner import Runner
from scalevec.study.scaling import fit_power_law, fitted_multiplier, interpolated_multipliers
from scalevec.study.spec import RunSpec
from scalevec.study.stats import paired, verdict
from scalevec.typed_config import ConfigError


def specs_of(name: str, lookup=lambda sp: None, **knobs) -> list[RunSpec]:
    k = knobs_for(name, "cpu")
    for key, v in knobs.items():
        setattr(k, key, v)
    out = []
    for _, stage in STUDIES[name].stages:
        out += stage(k, lookup)
    return out


# ------------------------------------------------------------------------------------------------------ grids


def test_every_arm_shares_init_and_data_seed_with_its_baseline():
    specs = specs_of("improvements", seeds=3)
    by_seed: dict[int, set[tuple[str, str]]] = {}
    for sp in specs:
        ov = dict(kv.split("=", 1) for kv in sp.config_overrides())
        assert ov["train.seed"] == ov["data.seed"] == str(sp.seed)
        by_seed.setdefault(sp.seed, set()).add(sp.arm)
    assert set(by_seed) == {0, 1, 2}
    assert all(arms == {"baseline", "hg", "dp", "dnp", "or", "er"} for arms in by_seed.values())
    assert len({sp.key for sp in specs}) == len(specs)  # every run has its own folder


def test_identical_runs_share_a_key_across_studies_and_stages():
    # necessity's LR sweep at the shared LR is the same run as its same-LR arm at seed 0 ...
    def lookup(sp):  # best LR = 3e-3
        return 2.0 + abs(math.log(sp.coords.get("lr", 3e-3) / 3e-3))

    nec = specs_of("necessity", lookup, steps=300)
    sweep = {sp.key for sp in nec if sp.stage == "sweep"}
    same = {sp.key for sp in nec if sp.group.startswith("same LR") and sp.seed == 0}
    assert same <= sweep
    # ... and the improvements baseline at the same steps is necessity's baseline
    imp = {sp.key for sp in specs_of("improvements", steps=300) if sp.arm == "baseline"}
    assert imp & {sp.key for sp in nec if sp.arm == "baseline"}
    # the re-tuned stage uses the sweep's best LR (3e-3 here for both)
    retuned = [sp for sp in nec if sp.group == "re-tuned LR"]
    assert {sp.overrides["optim.lr"] for sp in retuned} == {repr(3e-3)}


def test_weight_decay_and_unified_grids():
    wd = specs_of("weight-decay", seeds=2)
    assert {sp.overrides["scale.weight_decay"] for sp in wd} == {"none", "all", "input", "output"}
    assert all(sp.overrides["model.style"] == "gemma" and sp.baseline == "decay=none" for sp in wd)
    un = specs_of("unified", seeds=1)
    sizes = {sp.coords["size"] for sp in un if sp.coords["setup"] == "dense/adamw/cosine"}
    assert len(sizes) >= 3
    assert {sp.coords["setup"].split("/")[0] for sp in un} == {"dense", "moe"}
    n = {sp.coords["size"]: sp.coords["n_params"] for sp in un if sp.coords["setup"] == "dense/adamw/cosine"}
    assert n["xs"] < n["s"] < n["m"]
    steps = {
        sp.coords["size"]: int(sp.overrides["train.steps"])
        for sp in un
        if sp.coords["setup"] == "dense/adamw/cosine"
    }
    assert steps["xs"] < steps["s"] < steps["m"]  # fixed tokens per parameter


def test_best_lr_counts_diverged_runs_as_infinite():
    specs = specs_of("lr-sweep", strategies=["baseline"])
    loss = {3e-3: 2.0, 6e-3: 1.9, 1.2e-2: math.inf, 1.5e-3: 2.1}
    best = best_lrs(specs, lambda sp: loss[sp.coords["lr"]])
    assert best["baseline"]["lr"] == 6e-3 and not best["baseline"]["at_grid_edge"]


def test_knobs_are_typed_and_strict():
    k = knobs_for("improvements", "cpu")
    k.set("lrs", "[1e-3, 2e-3]")
    k.set("seeds", "7")
    assert k.lrs == [1e-3, 2e-3] and k.seeds == 7
    with pytest.raises(ConfigError):
        k.set("seedz", "3")
    with pytest.raises(ConfigError):
        knobs_for("nope", "cpu")


def test_grid_files_configure_the_ladder(tmp_path):
    grid = tmp_path / "grid.toml"
    grid.write_text(
        '[study]\nseeds = 2\nsetups = ["dense/muon/wsd"]\n[study.sizes]\n'
        'a = ["model.d_model=64", "model.n_layers=2"]\nb = ["model.d_model=96", "model.n_layers=2"]\n'
        'c = ["model.d_model=128", "model.n_layers=2"]\n'
    )
    k = knobs_for("unified", "cpu")
    k.load(grid)
    specs = STUDIES["unified"].stages[0][1](k, lambda sp: None)
    assert {sp.coords["size"] for sp in specs} == {"a", "b", "c"} and len(specs) == 3 * 2 * 2
    assert {sp.overrides["optim.name"] for sp in specs} == {"muon"}
    grid.write_text('[study]\nsetups = ["dense/sgd/wsd"]\n')
    k.load(grid)
    with pytest.raises(ConfigError, match="family/optimizer/schedule"):
        STUDIES["unified"].stages[0][1](k, lambda sp: None)


def test_runner_skips_finished_runs_and_records_failures(tmp_path):
    specs = specs_of("improvements", seeds=1, strategies=["baseline", "hg"])
    runner = Runner(tmp_path, jobs=2, python="/bin/false", log=lambda *_: None)  # any real launch fails
    for sp in specs:
        d = runner.run_dir(sp)
        d.mkdir(parents=True)
        (d / "summary.json").write_text(json.dumps({"final_val_loss": 2.5}))
    runner.execute(specs)  # nothing to launch: no failure
    assert all(runner.status(sp) == "done" and runner.lookup(sp) == 2.5 for sp in specs)
    extra = specs_of("improvements", seeds=2, strategies=["baseline"])[1]
    with pytest.raises(ConfigError, match="failed"):
        runner.execute([*specs, extra])
    assert runner.status(extra) == "failed" and runner.lookup(extra) is None  # retried on the next run
    (runner.run_dir(extra) / "config.toml").write_text("")
    assert "--resume" in runner.command(extra)


# ------------------------------------------------------------------------------------------------- statistics


def test_paired_test_resolves_a_small_consistent_effect():
    rng = np.random.default_rng(0)
    seed_noise = rng.normal(0, 0.05, 6)  # large seed-to-seed spread, shared by both arms
    base = {i: 2.0 + seed_noise[i] for i in range(6)}
    arm = {i: base[i] + 0.005 + rng.normal(0, 0.002) for i in range(6)}
    p = paired(arm, base)
    assert p.n == 6 and abs(p.mean - 0.005) < 0.003 and p.p < 0.01
    d = np.array([arm[i] - base[i] for i in range(6)])
    from scipy import stats

    assert p.min_sig == pytest.approx(stats.t.ppf(0.975, 5) * d.std(ddof=1) / math.sqrt(6))
    assert p.mde80 > p.min_sig
    assert verdict(p, +1) == "holds" and verdict(p, -1) == "contradicted"
    # unpaired, the same effect is invisible under the seed spread
    assert stats.ttest_ind(list(arm.values()), list(base.values())).pvalue > 0.5
    noisy = paired({i: base[i] + rng.normal(0, 0.01) for i in range(6)}, base)
    assert verdict(noisy, -1).startswith("not resolved") or noisy.p < 0.05
    assert verdict(paired({0: 1.0}, {0: 1.1}), -1).startswith("not testable")
    assert paired({0: math.inf, 1: 2.0}, {0: 2.0, 1: 2.0}).diverged


def test_scaling_fit_recovers_a_known_law_and_compute_multiplier():
    c = np.logspace(12, 16, 6)
    e, a, alpha = 1.7, 30.0, 0.28
    fit = fit_power_law(c, e + a * c**-alpha)
    assert fit.ok and fit.E == pytest.approx(e, rel=1e-3) and fit.alpha == pytest.approx(alpha, rel=1e-3)
    assert fit.A == pytest.approx(a, rel=1e-2)
    k = 1.25  # the other strategy reaches at compute C what the baseline reaches at k·C
    other = fit_power_law(c, e + a * (k * c) ** -alpha)
    assert fitted_multiplier(fit, other, float(e + a * 1e15**-alpha)) == pytest.approx(k, rel=1e-3)
    dense = np.logspace(12, 16, 40)
    im = interpolated_multipliers(dense, e + a * dense**-alpha, c, e + a * (k * c) ** -alpha)
    assert im and all(m == pytest.approx(k, rel=0.02) for _, m in im)
    few = fit_power_law(c[:3], (e + a * c**-alpha)[:3])
    assert not few.ok and "not reliable" in few.note
    assert not fit_power_law(c[:2], [2.0, 1.9]).ok


# ----------------------------------------------------------------------------------------------------- report


def fake_run(
    d: Path,
    seed: int,
    loss: float,
    gamma: float,
    n_params: int = 10_000,
    tokens: int = 100_000,
    tok_per_s: float = 1000.0,
) -> None:
    d.mkdir(parents=True)
    rows = []
    for step in (10, 20, 30):
        rows.append({"step": step, "tokens": step * 1000, "train_loss": loss + 1.0 / step})
        rows.append(
            {
                "step": step,
                "tokens": step * 1000,
                "val_loss": loss + 1.0 / step,
                "gamma/blocks.0.attn.qkv.in_scales.q/mean": gamma,
                "gamma/blocks.0.attn.qkv.in_scales.q/min": 0.9,
                "gamma/blocks.0.attn.qkv.in_scales.q/max": 1.1,
                "gamma/head.in_scale/mean": gamma,
            }
        )
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "summary.json").write_text(
        json.dumps(
            {
                "final_val_loss": loss,
                "params": 2 * n_params,
                "non_embedding_params": n_params,
                "tokens": tokens,
                "steps": 30,
                "wall_s": 1.0,
                "tok_per_s": tok_per_s,
                "strategy": "x",
                "model": "tiny",
                "optimizer": "adamw",
                "schedule": "cosine",
                "device": "cpu",
                "scale_vector_params": 10,
            }
        )
    )
    (d / "resources.json").write_text(json.dumps({"peak_rss_mib": 400.0}))


def test_report_writes_tables_verdicts_and_plots(tmp_path):
    runs, entries = tmp_path / "runs", []
    for seed in range(4):
        for arm, delta in (("baseline", 0.0), ("hg", -0.01)):
            sp = RunSpec(arm=arm, group="lr=0.003", seed=seed, overrides={"scale.strategy": arm})
            fake_run(runs / sp.key, seed, 2.0 + 0.05 * seed + delta + 0.001 * (seed % 2), 1.0 + seed / 10)
            entries.append({**sp.to_json(), "run_dir": f"../runs/{sp.key}"})
        for size, n in (("xs", 1e4), ("s", 4e4), ("m", 1.6e5), ("l", 6.4e5)):
            for arm, shift in (("baseline", 1.0), ("unified", 1.25)):
                loss = 1.5 + 40 * (6 * n * 10 * n * shift) ** -0.2 + 1e-4 * seed
                sp = RunSpec(
                    arm=arm,
                    group=f"dense/adamw/cosine {size}",
                    seed=seed,
                    overrides={"size": size, "scale.strategy": arm},
                    coords={"setup": "dense/adamw/cosine", "size": size},
                )
                fake_run(runs / sp.key, seed, loss, 1.0, n_params=int(n), tokens=int(10 * n))
                entries.append({**sp.to_json(), "run_dir": f"../runs/{sp.key}"})
    for lr in (1e-3, 3e-3):
        sp = RunSpec(
            arm=f"baseline lr={lr}",
            group="lr sweep",
            seed=0,
            overrides={"optim.lr": str(lr)},
            baseline=None,
            stage="sweep",
            coords={"lr": lr, "strategy": "baseline"},
        )
        fake_run(runs / sp.key, 0, 2.0 + lr, 1.0)
        entries.append({**sp.to_json(), "run_dir": f"../runs/{sp.key}"})
    study = tmp_path / "improvements"
    study.mkdir()
    (study / "study.json").write_text(
        json.dumps({"study": "improvements", "budget": "cpu", "knobs": {"seeds": 4}, "runs": entries})
    )
    md = write_report(study, tmp_path / "out")
    text = md.read_text()
    assert "| hg | 4 |" in text and "HOLDS" in text and "smallest effect" in text.lower()
    assert "Seeds per arm: 4; seeds per LR-sweep point: 1." in text  # counted from the run files
    assert "Loss vs compute" in text and "1.2" in text and "## Overhead" in text
    for png in (
        "loss_curves.png",
        "paired_deltas.png",
        "loss_vs_compute.png",
        "gamma_hg.png",
        "sweep_lr_sweep.png",
    ):
        assert (tmp_path / "out" / png).stat().st_size > 1000, png
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert res["groups"]["lr=0.003"]["arms"]["hg"]["paired"]["mean"] == pytest.approx(-0.01)
    mult = res["scaling"]["dense/adamw/cosine"]["multiplier_fit_unified"]
    assert mult == pytest.approx(1.25, rel=0.05)
    assert len((tmp_path / "out" / "runs.csv").read_text().splitlines()) == len(entries) + 1
    index = write_index({"improvements": md}, tmp_path).read_text()
    assert "HOLDS: HG alone lowers the final loss" in index and "(out/README.md)" in index

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from scalevec.study.report import export_tensorboard

    assert export_tensorboard(study, tmp_path / "tb") == len(entries)
    acc = EventAccumulator(str(tmp_path / "tb" / "lr_0_003" / "hg" / "seed1"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("val_loss")] == [10, 20, 30]


# --------------------------------------------------------------------------------------------- end to end


def test_micro_study_end_to_end(tmp_path, capsys):
    out = tmp_path / "study"
    argv = [
        "study",
        "improvements",
        "--budget",
        "cpu",
        "--seeds",
        "1",
        "--steps",
        "3",
        "--out",
        str(out),
        "--set",
        'strategies=["baseline","hg"]',
        "--set",
        "eval_points=1",
        "--override",
        "data.val_tokens=1024",
        "--override",
        "train.batch_size=2",
        "--override",
        "train.seq_len=32",
        "--override",
        "train.compile=false",  # 3 steps: compiling would cost more than the whole study
        "--report",
    ]
    assert cli_main(argv) == 0
    report = out / "improvements" / "report"
    text = (report / "README.md").read_text()
    assert "| hg | 1 |" in text and (report / "loss_curves.png").is_file()
    rows = [
        json.loads(ln)
        for ln in next((out / "runs").glob("hg-*")).joinpath("metrics.jsonl").read_text().splitlines()
    ]
    assert any(k.startswith("gamma/") and k.endswith("in_scales.v/mean") for r in rows for k in r)
    capsys.readouterr()
    assert cli_main(argv) == 0  # a rerun skips both finished runs
    assert "2 finished earlier, 0 to run" in capsys.readouterr().out


def test_cpu_studies_compile_only_where_a_compiler_exists(monkeypatch):
    from scalevec.study.grids import knobs_for

    monkeypatch.setattr("shutil.which", lambda name: "/usr/bin/" + name)
    assert "train.compile=true" in knobs_for("improvements", "cpu").base
    monkeypatch.setattr("shutil.which", lambda name: None)  # no C++ compiler: runs stay eager ("auto")
    assert not any(b.startswith("train.compile") for b in knobs_for("improvements", "cpu").base)
    assert not any(b.startswith("train.compile") for b in knobs_for("improvements", "gpu").base)


@pytest.mark.parametrize("grid", sorted((Path(__file__).parents[1] / "configs" / "studies").glob("*.toml")),
                         ids=lambda p: p.name)
def test_committed_grid_files_build_their_runs(grid):
    k = knobs_for("unified", "cpu")
    k.load(grid)
    specs = STUDIES["unified"].stages[0][1](k, lambda sp: None)
    assert specs and {sp.arm for sp in specs} == {"baseline", "unified"}
