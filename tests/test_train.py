"""The pre-training system end to end on CPU: files, learning, exact resume, torchrun, optimizers, schedules."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from scalevec.config import load_config
from scalevec.models import build_model, model_preset
from scalevec.optim import build_optimizer, lr_factor
from scalevec.roles import Role
from scalevec.strategy import preset
from scalevec.train import train
from scalevec.train.checkpoint import list_checkpoints
from scalevec.typed_config import ConfigError

FAST = ["model.preset=tiny", "train.batch_size=8", "train.seq_len=64", "train.progress=false",
        "train.log_every=5", "train.eval_every=10", "data.val_tokens=8192"]


def cfg_for(run_dir: Path, *extra: str):
    return load_config(None, [*FAST, *extra, f"run.out={run_dir}"])


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]


def unigram_entropy(files) -> float:
    from scalevec.data.shards import read_shard

    counts = np.bincount(np.concatenate([np.asarray(read_shard(f)) for f in files]))
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def test_train_writes_run_files_and_learns(tmp_path):
    from scalevec.data import resolve_data

    run = tmp_path / "run"
    cfg = cfg_for(run, "scale.strategy=unified", "train.steps=150", "train.eval_every=50")
    summary = train(cfg)
    for f in ("config.toml", "metrics.jsonl", "summary.json"):
        assert (run / f).is_file()
    assert list_checkpoints(run)
    rows = metrics(run)
    train_rows = [r for r in rows if "train_loss" in r]
    assert {"step", "tokens", "train_loss", "lr", "tok_per_s"} <= set(train_rows[0])
    assert {"step", "val_loss"} <= set(next(r for r in rows if "val_loss" in r))
    s = json.loads((run / "summary.json").read_text())
    assert {"final_val_loss", "params", "scale_vector_params", "tokens", "wall_s"} <= set(s)
    assert s == summary
    h = unigram_entropy(resolve_data(cfg.data).val_files)
    assert summary["final_val_loss"] < h - 0.5, (summary["final_val_loss"], h)


def test_resume_reproduces_uninterrupted_run_exactly(tmp_path):
    run = tmp_path / "run"
    cfg = cfg_for(run, "scale.strategy=unified", "train.steps=30", "train.ckpt_every=10", "train.keep_ckpts=5")
    train(cfg)
    full = metrics(run)
    final_weights = load_file(str(list_checkpoints(run)[-1] / "model.safetensors"))
    # Interrupt after step 10: drop the later checkpoints, resume.
    for ck in list_checkpoints(run)[1:]:
        shutil.rmtree(ck)
    train(cfg_for(run, "scale.strategy=unified", "train.steps=30", "train.ckpt_every=10", "train.keep_ckpts=5"),
          resume=True)
    def timeless(rows):
        return [{k: v for k, v in r.items() if k != "tok_per_s"} for r in rows]

    assert timeless(metrics(run)) == timeless(full)
    again = load_file(str(list_checkpoints(run)[-1] / "model.safetensors"))
    assert again.keys() == final_weights.keys()
    for k in again:
        assert torch.equal(again[k], final_weights[k]), k


def test_existing_run_is_not_overwritten(tmp_path):
    run = tmp_path / "run"
    train(cfg_for(run, "train.steps=5"))
    before = (run / "metrics.jsonl").read_text()
    with pytest.raises(ConfigError, match="already holds a run"):
        train(cfg_for(run, "train.steps=5"))
    with pytest.raises(ConfigError, match="model.d_model changed"):
        train(cfg_for(run, "train.steps=10", "model.d_model=64", "model.n_heads=2"), resume=True)
    assert (run / "metrics.jsonl").read_text() == before


def _torchrun(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", "-m", "scalevec",
           "train", *args]
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_torchrun_two_ranks_match_single_process(tmp_path, mode):
    """2 ranks x batch 4 see exactly the windows of 1 process x batch 8, so the losses must agree."""
    common = [*FAST, "train.steps=10", "train.precision=fp32", "train.ckpt_every=5"]
    single = tmp_path / "single"
    train(load_config(None, [*common, "train.batch_size=8", f"run.out={single}"]))
    dist = tmp_path / "dist"
    r = _torchrun([*common, "train.batch_size=4", f"dist.mode={mode}", f"run.out={dist}"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    a = [x["train_loss"] for x in metrics(single) if "train_loss" in x]
    b = [x["train_loss"] for x in metrics(dist) if "train_loss" in x]
    np.testing.assert_allclose(b, a, rtol=1e-5)
    assert json.loads((dist / "summary.json").read_text())["world_size"] == 2
    assert "global batch 8 sequences (4 per rank x 2 ranks x 1 accumulation) of 64 tokens" in r.stdout
    if mode == "fsdp":  # sharded checkpoints gather to a full state and resume exactly
        shutil.rmtree(list_checkpoints(dist)[-1])
        r = _torchrun(["--resume", str(dist)], tmp_path)
        assert r.returncode == 0, r.stderr[-3000:]
        c = [x["train_loss"] for x in metrics(dist) if "train_loss" in x]
        assert c == b


def _tiny_model(strategy="unified"):
    mc = model_preset("tiny")
    mc.vocab_size = 64
    torch.manual_seed(0)
    return build_model(mc, preset(strategy))


def test_muon_routes_by_role():
    cfg = load_config(None, ["optim.name=muon", "scale.strategy=unified"])
    m = _tiny_model()
    opt = build_optimizer(m, cfg.optim, cfg.scale.weight_decay)
    muon_roles = {g["role"] for g in opt.optimizers["muon"].param_groups}
    adam_roles = {g["role"] for g in opt.optimizers["adamw"].param_groups}
    assert muon_roles == {Role.MATRIX.value}
    assert adam_roles == {"embedding", "head", "input_scale", "output_scale"}
    assert all(p.ndim == 2 for g in opt.optimizers["muon"].param_groups for p in g["params"])
    x = torch.randint(0, 64, (2, 16))
    m(x, x).backward()
    opt.step()


def test_lr_multipliers_and_decay_reach_groups():
    cfg = load_config(None, ["optim.lr=0.01", "optim.lr_mult={input_scale=3.0}", "scale.strategy=iwd"])
    opt = build_optimizer(_tiny_model("iwd"), cfg.optim, cfg.scale.weight_decay)
    g = {g["role"]: g for g in opt.param_groups}
    assert g["input_scale"]["lr"] == pytest.approx(0.03) and g["input_scale"]["weight_decay"] == 0.1
    assert g["matrix"]["lr"] == pytest.approx(0.01)


def test_schedules():
    s = load_config(None, ["schedule.name=cosine", "schedule.warmup=10", "schedule.min_lr_ratio=0.1"]).schedule
    assert lr_factor(0, 100, s) == pytest.approx(0.1)
    assert lr_factor(9, 100, s) == pytest.approx(1.0)
    assert lr_factor(99, 100, s) == pytest.approx(0.1, abs=1e-3)
    w = load_config(None, ["schedule.name=wsd", "schedule.warmup=0", "schedule.decay_fraction=0.2",
                           "schedule.min_lr_ratio=0.0"]).schedule
    assert [lr_factor(i, 100, w) for i in (0, 50, 79)] == [1.0, 1.0, 1.0]
    assert lr_factor(99, 100, w) == pytest.approx(0.0)
    assert lr_factor(89, 100, w) == pytest.approx(0.5)
    for shape, mid in (("cosine", 0.5), ("1-sqrt", 1 - math.sqrt(0.5))):
        w.decay_shape = shape
        assert lr_factor(89, 100, w) == pytest.approx(mid)
    c = load_config(None, ["schedule.name=constant", "schedule.warmup=0"]).schedule
    assert lr_factor(77, 100, c) == 1.0
    lin = load_config(None, ["schedule.name=linear", "schedule.warmup=0", "schedule.min_lr_ratio=0"]).schedule
    assert lr_factor(50, 100, lin) == pytest.approx(0.5, abs=0.02)


def test_cli_reports_bad_key_in_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "scalevec", "train", "train.stepz=3", f"run.out={tmp_path / 'x'}"],
                       capture_output=True, text=True, check=False)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "train.stepz" in r.stderr
    assert not (tmp_path / "x").exists()


def test_gamma_statistics_and_tensorboard(tmp_path):
    """Every evaluation row holds per-site γ statistics; with train.tensorboard the same scalars reach an event
    file that TensorBoard reads back."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    train(cfg_for(run, "scale.strategy=unified", "train.steps=10", "train.tensorboard=true"))
    evals = [r for r in metrics(run) if "val_loss" in r]
    assert evals and all("gamma/blocks.0.attn.q.in/mean" in r for r in evals)
    last = evals[-1]
    # OR gains report their magnitude; training has moved the gains away from their init of 1.
    assert "gamma/blocks.0.mlp.gate.out/magnitude" in last
    assert last["gamma/blocks.0.attn.q.in/std"] > 0
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"val_loss", "train_loss", "gamma/blocks.0.attn.q.in/mean"} <= tags
    assert [e.step for e in acc.Scalars("val_loss")] == [r["step"] for r in evals]
    assert acc.Scalars("val_loss")[-1].value == pytest.approx(last["val_loss"], rel=1e-6)


def test_compile_auto_policy(monkeypatch, tmp_path):
    from scalevec.train.trainer import COMPILE_AUTO_MIN_STEPS, use_compile

    cpu = torch.device("cpu")
    assert use_compile(True, 10, cpu) and not use_compile(False, 10**6, cpu)
    assert not use_compile("auto", COMPILE_AUTO_MIN_STEPS - 1, cpu)  # short runs stay eager
    monkeypatch.setattr("shutil.which", lambda name: None)  # no C++ compiler: inductor cannot build kernels
    assert not use_compile("auto", COMPILE_AUTO_MIN_STEPS, cpu)
    monkeypatch.setattr("shutil.which", lambda name: "/usr/bin/" + name)
    assert use_compile("auto", COMPILE_AUTO_MIN_STEPS, cpu)
    real_paths = sysconfig.get_paths
    monkeypatch.setattr(sysconfig, "get_paths", lambda: {**real_paths(), "include": "/nonexistent"})
    assert not use_compile("auto", COMPILE_AUTO_MIN_STEPS, cpu)  # a compiler but no Python.h: kernels won't build
    with pytest.raises(ConfigError, match="train.compile=true: torch.compile on CPU needs a C\\+\\+ compiler"):
        use_compile(True, 10, cpu)
    with pytest.raises(ConfigError, match="train.compile=true"):  # refused before the run folder exists
        train(cfg_for(tmp_path / "run", "train.compile=true", "train.steps=2"))
    assert not (tmp_path / "run").exists()
    assert load_config(None, []).train.compile == "auto"
    with pytest.raises(ConfigError, match="train.compile: expected true or false or 'auto'"):
        load_config(None, ["train.compile=maybe"])


def test_demo_compares_reuses_and_names_what_changed(tmp_path, capsys):
    from scalevec.demo import run_demo, steady_tok_per_s

    fast = ["train.batch_size=4", "train.seq_len=32", "train.progress=false", "train.eval_every=5",
            "train.log_every=2", "train.compile=false", "data.val_tokens=4096"]
    assert run_demo(tmp_path, fast, steps=6) == 0
    out = capsys.readouterr().out
    assert "NOT A VERDICT" in out and "Committed verdict of the unified study" in out and "nats/byte" in out
    table = (tmp_path / "demo.txt").read_text()
    assert "baseline" in table and "unified" in table and (tmp_path / "loss.png").stat().st_size > 1000
    tps = steady_tok_per_s(tmp_path / "unified")  # the windows after the first one (steps 4 and 6)
    assert tps is not None and f"{tps:,.0f}" in table.splitlines()[2]
    capsys.readouterr()
    assert run_demo(tmp_path, fast, steps=6) == 0  # the same config: both finished runs are reused
    assert capsys.readouterr().out.count("finished earlier") == 2
    before = (tmp_path / "baseline" / "summary.json").read_text()
    with pytest.raises(ConfigError, match=r"another config \(train\.steps: 6 -> 7\)"):
        run_demo(tmp_path, fast, steps=7)
    assert (tmp_path / "baseline" / "summary.json").read_text() == before  # nothing saved is lost


# ---------------------------------------------------------------------------------------------- what a run says


def _small_corpus(tmp_path: Path) -> Path:
    path = tmp_path / "small.txt"
    lines = [f"line {i}: the quick brown fox jumps over the lazy dog {i * 7 % 13}" for i in range(120)]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_data_line_reports_tokens_epochs_and_global_batch(tmp_path, capsys):
    """Before training: the corpus in tokens, the global batch (per rank x ranks x accumulation) and the epochs
    the run takes; above EPOCH_WARNING epochs a warning follows. The numbers are the loader's own."""
    from scalevec.cli import main
    from scalevec.data import TokenLoader, resolve_data
    from scalevec.train.trainer import EPOCH_WARNING, data_report

    args = ["model.preset=tiny", "train.batch_size=4", "train.seq_len=32", "train.grad_accum=2",
            "train.progress=false", "train.eval_every=0", "train.steps=100", "data.tokenizer=byte",
            f"data.source={_small_corpus(tmp_path)}", f"data.dir={tmp_path / 'prep'}", "data.val_tokens=256"]
    capsys.readouterr()
    assert main(["train", *args, f"run.out={tmp_path / 'run'}"]) == 0
    out = capsys.readouterr().out.splitlines()
    spec = resolve_data(load_config(None, args).data)
    loader = TokenLoader(spec.train_files, 4, 32)
    epochs = 100 * 2 / loader.steps_per_epoch
    assert epochs > EPOCH_WARNING
    line = next(ln for ln in out if ln.startswith("data: "))
    assert line == (f"data: {loader.stream.n_tokens:,} training tokens, vocabulary 257; global batch 8 sequences "
                    f"(4 per rank x 1 rank x 2 accumulation) of 32 tokens = 256 tokens per step; 100 steps take "
                    f"{epochs:.3g} epochs")
    warning = out[out.index(line) + 1]
    assert warning.startswith(f"warning: 100 steps take {epochs:.1f} epochs of the training data (more than 4)")
    short = load_config(None, [*args, "train.steps=10"])
    short.data.vocab_size = 257
    assert len(data_report(short, loader, 1)) == 1  # under the threshold: the line alone


def test_config_records_the_vocabulary_used(tmp_path, capsys):
    """config.toml says which vocabulary the run used: the byte tokenizer's 257, or the size a BPE reached
    when the corpus ran out of merges short of data.vocab_size; such a run still resumes."""
    from scalevec.cli import main
    from scalevec.typed_config import load_toml

    common = ["model.preset=tiny", "train.batch_size=4", "train.seq_len=32", "train.progress=false",
              "train.eval_every=0", "train.steps=4", f"data.source={_small_corpus(tmp_path)}",
              "data.val_tokens=128"]
    byte = tmp_path / "byte"
    assert main(["train", *common, "data.tokenizer=byte", f"data.dir={tmp_path / 'pb'}", f"run.out={byte}"]) == 0
    saved = load_toml(byte / "config.toml")
    assert saved["data"]["vocab_size"] == 257 and saved["model"]["vocab_size"] == 320
    bpe = tmp_path / "bpe"
    capsys.readouterr()
    assert main(["train", *common, "data.tokenizer=bpe", "data.vocab_size=4096", f"run.out={bpe}"]) == 0
    out = capsys.readouterr().out
    got = load_toml(bpe / "config.toml")["data"]["vocab_size"]
    tokenizer_ids = json.loads((bpe / "tokenizer" / "tokenizer.json").read_text())["model"]["vocab"]
    assert 257 <= got < 4096 and got == len(tokenizer_ids)
    assert f"vocabulary {got:,} (the BPE ran out of merges short of the 4,096 asked for)" in out
    assert main(["train", "--resume", str(bpe), "train.steps=6"]) == 0


def test_extending_a_wsd_run_from_before_its_decay_equals_the_longer_run(tmp_path, capsys):
    """A WSD run keeps the checkpoint where its decay starts; continuing from it with a larger train.steps
    (the stable phase stretched, the decay at the new end) gives exactly the run planned that long from the
    start, when the warmup is a step count. The newer checkpoints are set aside, not resumed later."""
    from scalevec.cli import main
    from scalevec.train.checkpoint import is_pinned

    common = [*FAST, "schedule.name=wsd", "schedule.warmup=4", "train.ckpt_every=0", "train.keep_ckpts=1",
              "train.precision=fp32"]
    run, ref = tmp_path / "run", tmp_path / "ref"
    assert main(["train", *common, "train.steps=40", f"run.out={run}"]) == 0
    assert [p.name for p in list_checkpoints(run)] == ["step_00000032", "step_00000040"]  # 32: pinned, kept
    assert is_pinned(list_checkpoints(run)[0])
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--from-step", "32", "train.steps=60"]) == 0
    out = capsys.readouterr().out
    assert ("schedule: train.steps 40 -> 60: wsd recomputed for 60 steps; the LR of step 33 goes from 2.66e-03 "
            "(step 33 of the 40-step schedule) to 3.00e-03 (decay over steps 49-60)") in out
    assert (run / "checkpoints" / "superseded_step_00000040").is_dir()
    assert main(["train", *common, "train.steps=60", f"run.out={ref}"]) == 0

    def timeless(rows):
        return [{k: v for k, v in r.items() if k != "tok_per_s"} for r in rows]

    assert timeless(metrics(run)) == timeless(metrics(ref))
    a, b = (load_file(str(list_checkpoints(d)[-1] / "model.safetensors")) for d in (run, ref))
    assert all(torch.equal(a[k], b[k]) for k in a)
    rc = main(["train", "--resume", str(run), "--from-step", "7"])
    assert rc == 2 and "has no checkpoint of step 7; checkpoints kept: 32, 48, 60" in capsys.readouterr().err


def test_schedule_note_names_the_jump_and_the_way_around_it(tmp_path):
    """Extending a finished WSD run from its last checkpoint raises the LR again; the note says by how much and
    names the command that continues from before the decay instead (the path quoted for a shell)."""
    from scalevec.train.resume import schedule_note

    run = tmp_path / "my run"
    for step in (16, 20):
        (run / "checkpoints" / f"step_{step:08d}").mkdir(parents=True)
    saved = load_config(None, ["schedule.name=wsd", "train.steps=20", "optim.lr=3e-3"])
    longer = load_config(None, ["schedule.name=wsd", "train.steps=30", "optim.lr=3e-3"])
    note = schedule_note(run, saved, longer, start=20, trained_for=20)
    assert note == ("schedule: train.steps 20 -> 30: wsd recomputed for 30 steps; the LR of step 21 goes from "
                    "3.00e-04 (where it ended) to 3.00e-03 (decay over steps 25-30); to stretch the stable phase "
                    f"instead, continue from before the decay: scalevec train --resume '{run}' --from-step 16 "
                    "train.steps=30")
    assert schedule_note(run, saved, saved, start=20, trained_for=20) is None  # same length: nothing to say
    cosine = load_config(None, ["train.steps=30", "optim.lr=3e-3"])
    assert "cosine recomputed for 30 steps; the LR of step 11 goes from" in schedule_note(
        run, load_config(None, ["train.steps=20", "optim.lr=3e-3"]), cosine, start=10, trained_for=20)


def test_a_run_off_a_terminal_logs_lines_and_ends_with_one_human_line(tmp_path, capsys):
    """stderr captured (not a TTY): progress is a log line per logged step, no bar redraws; the run ends with
    one line (val loss, tokens, time, tok/s, MFU, summary path) instead of a JSON dump."""
    from scalevec.cli import main

    run = tmp_path / "run"
    capsys.readouterr()
    assert main(["train", *FAST, "train.progress=true", "train.steps=10", f"run.out={run}"]) == 0
    out, err = capsys.readouterr()
    assert "\r" not in out + err and "{" not in out
    lines = out.splitlines()
    assert [ln.split()[1] for ln in lines if ln.startswith("step ") and "/10" in ln] == ["5/10", "10/10"]
    summary = json.loads((run / "summary.json").read_text())
    done = lines[-1]
    assert done.startswith(f"done: val loss {summary['final_val_loss']:.4f}, {summary['tokens']:,} tokens in ")
    assert f"{summary['tok_per_s']:,.0f} tok/s, MFU " in done and done.endswith(f"summary: {run / 'summary.json'}")
    mfu, peak = re.search(r"MFU ([\d.]+)% of this device's measured bfloat16 matmul peak \(([\d,]+) GFLOP/s\)",
                          done).groups()
    expected = 100 * summary["tok_per_s"] * summary["flops_per_token"] / (float(peak.replace(",", "")) * 1e9)
    assert float(mfu) == pytest.approx(expected, rel=0.05, abs=0.06)


def test_progress_is_a_bar_on_a_terminal_and_lines_elsewhere(capsys):
    from scalevec.train.progress import Progress, clock

    row = {"train_loss": 2.5, "tok_per_s": 1000.0, "lr": 1e-3}
    bar = Progress(True, 4, 0, "run", interactive=True)
    for done in range(1, 5):
        bar.step(done, row if done % 2 == 0 else None)
    bar.note("step 4: val_loss 2.4000")
    bar.close()
    out, err = capsys.readouterr()
    assert out == "step 4: val_loss 2.4000\n" and "\r" in err and "4/4" in err  # the note above the bar, on stdout
    lines = Progress(True, 4, 0, "run", interactive=False)
    for done in range(1, 5):
        lines.step(done, row if done % 2 == 0 else None)
    lines.close()
    out, err = capsys.readouterr()
    assert err == "" and [ln.split()[:4] for ln in out.splitlines()] == [["step", "2/4", "loss", "2.5000"],
                                                                        ["step", "4/4", "loss", "2.5000"]]
    silent = Progress(False, 4, 0, "run")
    silent.step(2, row)
    silent.note("quiet")
    assert capsys.readouterr() == ("", "")
    assert [clock(s) for s in (42, 185, 7620)] == ["42s", "3m05s", "2h07m"]
