"""Faults a pre-training run meets (SIGKILL, corrupt or malicious checkpoints, divergence, bad input, a full
disk), each provoked for real. docs/reliability.md lists them with their outcome; keep the two in step.

Runs are the tiny preset on byte-level Shakespeare with one thread per process, so results are bitwise
reproducible and the file stays around a minute on two cores. ``SCALEVEC_TEST_SEED`` picks other kill points
for the SIGKILL test (CI runs the default seed).
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from scalevec.cli import main
from scalevec.config import load_config
from scalevec.data import resolve_data, write_shard
from scalevec.fileio import sha256_file as sha256
from scalevec.train import checkpoint as ckpt_mod
from scalevec.train.checkpoint import (
    FAULT_ENV,
    CheckpointError,
    list_checkpoints,
    load_checkpoint,
    verify,
)

BASE = ["model.preset=tiny", "train.batch_size=8", "train.seq_len=64", "train.progress=false",
        "train.threads=1", "train.log_every=1", "train.eval_every=8", "data.val_tokens=2048",
        "data.tokenizer=byte"]
STAGES = ("model.safetensors", "state.pt", "manifest.json", "rename", "prune")  # kill_in_ckpt stages in order
FILE_STAGES = STAGES[:3]  # before the rename


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> list[str]:
    """BASE plus byte-level shards prepared once, so that concurrent subprocesses only read them."""
    data = tmp_path_factory.mktemp("data")
    args = [*BASE, f"data.dir={data}"]
    resolve_data(load_config(None, args).data)
    return args


@pytest.fixture(autouse=True)
def _isolate(monkeypatch):
    """In-process runs set torch's thread count and must not inherit a fault from the environment."""
    monkeypatch.delenv(FAULT_ENV, raising=False)
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    """``scalevec ARGV`` in this process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def metrics(run: Path) -> list[dict]:
    """Rows of metrics.jsonl; a last line being written (or cut by a kill) is left out."""
    rows = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return rows


def timeless(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "tok_per_s"} for r in rows]


def steps_of(run: Path) -> list[int]:
    return [int(p.name.removeprefix("step_")) for p in list_checkpoints(run)]


def all_verify(run: Path) -> None:
    for ck in list_checkpoints(run):
        verify(ck)


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): sha256(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


# ---------------------------------------------------------------------------------------------- SIGKILL


def _env(fault: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != FAULT_ENV}
    env["OMP_NUM_THREADS"] = "1"
    if fault:
        env[FAULT_ENV] = fault
    return env


def spawn(*argv: str, fault: str | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "scalevec", *argv], env=_env(fault), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def run_cli(*argv: str, fault: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "scalevec", *argv], env=_env(fault), text=True,
                          capture_output=True, timeout=300, check=False)


def check_after_ckpt_kill(run: Path, step: int, stage: str, every: int, keep: int) -> None:
    """The process died while saving ``step``: what is on disk must be exactly what the design promises."""
    all_verify(run)
    steps, root = steps_of(run), run / "checkpoints"
    assert max(r["step"] for r in metrics(run)) == step  # logged before the checkpoint: resume must drop them
    if stage in FILE_STAGES:  # the previous checkpoint is the newest; the new one is a .tmp_ folder
        assert (steps[-1] if steps else 0) == step - every, (stage, steps)
        assert list(root.glob(f".tmp_step_{step:08d}_*")), "the half-written checkpoint is a .tmp_ folder"
    else:  # renamed into place (and, for "prune", the oldest moved aside but not yet deleted)
        assert steps[-1] == step, (stage, steps)
    if stage == "prune":
        assert list(root.glob(".tmp_del_step_*")) and len(steps) == keep


def wait_for_row(run: Path, step: int, proc: subprocess.Popen, timeout: float = 180) -> None:
    """Until metrics.jsonl holds a row for ``step`` or later (or the process ends)."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if (run / "metrics.jsonl").exists() and any(r["step"] >= step for r in metrics(run)):
            return
        time.sleep(0.01)


@pytest.mark.slow
def test_sigkill_anywhere_then_resume_matches_uninterrupted_run(tmp_path, base, capsys):
    """Killed twice mid-checkpoint (self-inflicted, at seeded steps and stages) and once from outside at a
    random moment, then resumed: losses, evaluations and weights equal an uninterrupted run's bit for bit."""
    seed = int(os.environ.get("SCALEVEC_TEST_SEED", "0"))
    rng = random.Random(seed)
    every, keep, steps = 4, 2, 20
    args = [*base, f"train.steps={steps}", f"train.ckpt_every={every}", f"train.keep_ckpts={keep}"]
    ref, run = tmp_path / "ref", tmp_path / "run"

    # 1-2: SIGKILL inside save_checkpoint at seeded steps: mid-write, then after the rename or mid-prune.
    s1, stage1 = rng.choice([4, 8]), rng.choice(FILE_STAGES)
    s2, stage2 = rng.choice([12, 16]), rng.choice(("rename", "prune"))
    note = f"seed {seed}: kill_in_ckpt {s1}:{stage1}, {s2}:{stage2}"
    first = spawn("train", *args, f"run.out={run}", fault=f"kill_in_ckpt:{s1}:{stage1}")
    assert cli(capsys, "train", *args, f"run.out={ref}")[0] == 0  # the uninterrupted run, meanwhile
    _, err = first.communicate(timeout=300)
    assert first.returncode == -signal.SIGKILL, (note, err[-2000:])
    check_after_ckpt_kill(run, s1, stage1, every, keep)
    p = run_cli("train", "--resume", str(run), fault=f"kill_in_ckpt:{s2}:{stage2}")
    assert p.returncode == -signal.SIGKILL, (note, p.stderr[-2000:])
    assert "removed 1 temporary checkpoint folder(s) left by a crash" in p.stdout, note
    check_after_ckpt_kill(run, s2, stage2, every, keep)

    # 3: SIGKILL from outside, a random moment after a random step (maybe mid-checkpoint or mid-eval).
    target = rng.randint(s2 + 1, steps - 3)
    proc = spawn("train", "--resume", str(run))
    wait_for_row(run, target, proc)
    time.sleep(rng.uniform(0, 0.1))
    proc.kill()
    proc.communicate()
    all_verify(run)
    newest = steps_of(run)[-1]
    note += f", external kill after step {target} (newest checkpoint {newest})"

    # 4: resume to the end; rows the killed attempts logged past their checkpoint are dropped and redone.
    p = run_cli("train", "--resume", str(run))
    assert p.returncode == 0, (note, p.stderr[-2000:])
    assert f"at step {newest}" in p.stdout, note

    assert timeless(metrics(run)) == timeless(metrics(ref)), note
    assert steps_of(run) == steps_of(ref) == [steps - every, steps], note  # the newest keep_ckpts
    assert_same_weights(list_checkpoints(run)[-1], list_checkpoints(ref)[-1])
    timed = {"wall_s", "tok_per_s"}
    s_run, s_ref = ({k: v for k, v in json.loads((d / "summary.json").read_text()).items() if k not in timed}
                    for d in (run, ref))
    assert s_run == s_ref
    assert not list((run / "checkpoints").glob(".tmp_*")), "crash leftovers are removed by the next save"


@pytest.mark.slow
@pytest.mark.parametrize(("signum", "who"), [(signal.SIGTERM, "SIGTERM"), (signal.SIGINT, "Ctrl-C (SIGINT)")],
                         ids=["sigterm", "sigint"])
def test_stop_signal_saves_a_checkpoint_and_resume_matches_uninterrupted_run(tmp_path, base, capsys, signum, who):
    """SIGTERM (a scheduler's preemption) or a first Ctrl-C mid-run: the step in flight finishes, a checkpoint
    of it is saved even between checkpoint intervals, the process exits 128 + the signal with a one-line note,
    the checkpoint loads, and --resume continues exactly."""
    steps = 60
    args = [*base, f"train.steps={steps}", "train.ckpt_every=0", "train.eval_every=20"]
    ref, run = tmp_path / "ref", tmp_path / "run"
    proc = spawn("train", *args, f"run.out={run}")
    wait_for_row(run, 2, proc)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signum, err[-2000:]
    stopped = max(r["step"] for r in metrics(run))
    assert stopped < steps and steps_of(run) == [stopped]  # ckpt_every=0 would have saved only at the end
    assert err.strip() == (f"stopped: stopped by {who} after step {stopped}; its checkpoint is saved; "
                           f"continue with scalevec train --resume {run}")
    _, state = load_checkpoint(list_checkpoints(run)[-1])
    assert state["step"] == stopped
    assert cli(capsys, "train", *args, f"run.out={ref}")[0] == 0
    p = run_cli("train", "--resume", str(run))
    assert p.returncode == 0 and f"at step {stopped}" in p.stdout, p.stderr[-2000:]
    assert timeless(metrics(run)) == timeless(metrics(ref))
    assert_same_weights(list_checkpoints(run)[-1], list_checkpoints(ref)[-1])


@pytest.mark.slow
def test_second_ctrl_c_aborts_at_once_and_the_last_checkpoint_stays_intact(tmp_path, base, capsys):
    """Two Ctrl-Cs while the checkpoint of step 8 is being written: the first asks for a stop, the second
    aborts the save at once (exit 130, one line). The step 4 checkpoint is the newest and verifies; the
    half-written one is a .tmp_ folder that the resume removes, and the resumed run matches an uninterrupted one."""
    args = [*base, "train.steps=12", "train.ckpt_every=4", "train.keep_ckpts=3"]
    run, ref = tmp_path / "run", tmp_path / "ref"
    p = run_cli("train", *args, f"run.out={run}", fault="sigint_in_ckpt:8")
    assert p.returncode == 130, p.stderr[-2000:]
    assert p.stderr.strip() == ("interrupted: the newest complete checkpoint is intact; continue with scalevec "
                                f"train --resume {run}")
    assert steps_of(run) == [4] and list((run / "checkpoints").glob(".tmp_step_00000008_*"))
    all_verify(run)
    p = run_cli("train", "--resume", str(run))
    assert p.returncode == 0 and "removed 1 temporary checkpoint folder(s)" in p.stdout, p.stderr[-2000:]
    assert cli(capsys, "train", *args, f"run.out={ref}")[0] == 0
    assert timeless(metrics(run)) == timeless(metrics(ref))
    assert_same_weights(list_checkpoints(run)[-1], list_checkpoints(ref)[-1])


def test_stop_signal_handler_counts_ctrl_c_and_restores_the_previous_handlers():
    """In-process: SIGTERM or one SIGINT only records the request; a second SIGINT raises KeyboardInterrupt;
    leaving the block restores whatever handlers were there."""
    from scalevec.train.signals import StopSignal

    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with StopSignal() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        assert stop.signum == signal.SIGTERM
    with StopSignal() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        assert stop.requested and stop.signum == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    assert {s: signal.getsignal(s) for s in before} == before


# ---------------------------------------------------------------------------------------------- corrupt


def test_corrupt_checkpoints_are_reported_and_resume_falls_back(tmp_path, base, capsys):
    run = tmp_path / "run"
    assert cli(capsys, "train", *base, "train.steps=8", "train.ckpt_every=2", "train.keep_ckpts=3",
               f"run.out={run}")[0] == 0
    ckpts = list_checkpoints(run)
    assert steps_of(run) == [4, 6, 8]  # the newest keep_ckpts
    full, final = timeless(metrics(run)), tmp_path / "final"
    shutil.copytree(ckpts[-1], final)

    state = ckpts[2] / "state.pt"  # truncated
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    weights = ckpts[1] / "model.safetensors"  # one bit flipped
    raw = bytearray(weights.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    weights.write_bytes(bytes(raw))
    for ck, name in ((ckpts[2], "state.pt"), (ckpts[1], "model.safetensors")):
        with pytest.raises(CheckpointError) as e:
            verify(ck)
        assert str(e.value) == f"checkpoint {ck}: {name} fails its sha256 check (truncated or corrupted)"
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 9, "train_lo')  # a row cut short by a crash

    rc, out, _ = cli(capsys, "train", "--resume", str(run))
    assert rc == 0
    warnings = [ln for ln in out.splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 2, out
    assert "step_00000008: state.pt fails its sha256 check" in warnings[0]
    assert "step_00000006: model.safetensors fails its sha256 check" in warnings[1]
    assert all("falling back to step_00000004" in w for w in warnings)
    assert f"resumed from {ckpts[0]} at step 4" in out
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "corrupt_step_00000006", "corrupt_step_00000008", *(c.name for c in ckpts)]
    assert timeless(metrics(run)) == full
    assert_same_weights(list_checkpoints(run)[-1], final)

    # Nothing valid left: refused in one line, nothing moved or rewritten.
    for ck in list_checkpoints(run):
        (ck / "manifest.json").write_text("{")
    before = snapshot(run)
    rc, _, err = cli(capsys, "train", "--resume", str(run))
    assert rc == 1
    assert "no valid checkpoint" in one_error_line(err) and "manifest.json is unreadable" in err
    assert snapshot(run) == before


# ---------------------------------------------------------------------------------------------- divergence


@pytest.mark.parametrize(("fault", "extra", "message", "groups"), [
    ("nan_grad:6:input_scale", [], "non-finite gradient at step 6", ["input_scale (first: blocks.0."]),
    ("inf_loss:6", [], "non-finite loss at step 6", ["embedding (first: embed)", "matrix (first: blocks.0."]),
    (None, ["optim.lr=1e30", "schedule.warmup=0"], "non-finite gradient at step ", ["matrix (first: "]),
    ("nan_grad:6:matrix", ["optim.name=muon"], "non-finite gradient at step 6", ["matrix (first: blocks.0."]),
], ids=["nan-grad", "inf-loss", "lr-overflow", "nan-grad-muon"])
def test_nonfinite_stops_naming_step_and_groups(tmp_path, base, capsys, monkeypatch, fault, extra, message,
                                                groups):
    if fault:
        monkeypatch.setenv(FAULT_ENV, fault)
    run = tmp_path / "run"
    every = 1 if extra else 4
    rc, _, err = cli(capsys, "train", *base, *extra, "train.steps=12", f"train.ckpt_every={every}",
                     f"run.out={run}")
    line = one_error_line(err)
    assert rc == 1 and message in line, line
    assert all(g in line for g in groups), line
    if fault and fault.startswith("nan_grad"):  # only the poisoned group is named
        poisoned = fault.split(":")[2]
        assert all(r not in line for r in ("matrix", "embedding", "input_scale") if r != poisoned), line
    failed = int(line.split(" at step ")[1].split()[0])
    assert f"the last good checkpoint {list_checkpoints(run)[-1]} is kept" in line
    assert steps_of(run)[-1] == (failed - 1) // every * every  # nothing saved after the last good step
    all_verify(run)
    assert not (run / "summary.json").exists()


def test_nonfinite_step_is_found_at_the_next_read_and_named_exactly(tmp_path, base, capsys, monkeypatch):
    """Stop mode reads the device only at logged, evaluated and saved steps: a NaN at step 6, with logs at 5 and
    10 and checkpoints at 4 and 8, is found before step 8's evaluation and checkpoint, and named as step 6 with
    the group it was injected into; nothing after step 5 is written."""
    monkeypatch.setenv(FAULT_ENV, "nan_grad:6:input_scale")
    run = tmp_path / "run"
    rc, _, err = cli(capsys, "train", *base, "train.steps=12", "train.log_every=5", "train.ckpt_every=4",
                     f"run.out={run}")
    line = one_error_line(err)
    assert rc == 1 and "non-finite gradient at step 6" in line and "input_scale (first: blocks.0." in line, line
    assert "matrix" not in line and "embedding" not in line
    assert steps_of(run) == [4] and "the last good checkpoint" in line and line.count("step_00000004") == 1
    assert max(r["step"] for r in metrics(run)) == 5 and not (run / "summary.json").exists()


@pytest.mark.parametrize(("mode", "most"), [("stop", 12), ("skip", None)])
def test_stop_mode_reads_the_device_only_when_it_logs(tmp_path, base, monkeypatch, mode, most):
    """Host reads (item, tolist, bool, int, float of a tensor) made by the training loop itself in 30 steps
    logged every 10: a few per logged step in stop mode; at least one per step in skip mode, which must decide
    each update on the host."""
    from scalevec.train import trainer

    here = {trainer.__file__, sys.modules["scalevec.train.nonfinite"].__file__}
    reads = []
    for name in ("item", "tolist", "__bool__", "__int__", "__float__"):
        real = getattr(torch.Tensor, name)

        def counted(self, *a, _real=real, **k):
            if sys._getframe(1).f_code.co_filename in here:
                reads.append(sys._getframe(1).f_lineno)
            return _real(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)
    cfg = load_config(None, [*base, "train.steps=30", "train.log_every=10", "train.eval_every=0",
                             "train.ckpt_every=0", f"train.on_nonfinite={mode}", f"run.out={tmp_path / 'run'}"])
    trainer.train(cfg)
    if most is None:
        assert len(reads) >= 30, reads
    else:
        assert 0 < len(reads) <= most, reads


def test_skip_mode_skips_and_counts_nonfinite_steps(tmp_path, base, capsys, monkeypatch):
    monkeypatch.setenv(FAULT_ENV, "nan_grad:3,inf_loss:5")
    run = tmp_path / "run"
    rc, out, _ = cli(capsys, "train", *base, "train.steps=8", "train.on_nonfinite=skip", f"run.out={run}")
    assert rc == 0
    skips = [ln for ln in out.splitlines() if ln.startswith("warning:")]
    assert len(skips) == 2 and "gradient at step 3" in skips[0] and "loss at step 5" in skips[1], out
    assert skips[1].endswith("step skipped (2 so far)")
    counted = {r["step"]: r.get("skipped_steps", 0) for r in metrics(run) if "train_loss" in r}
    assert counted == {1: 0, 2: 0, 3: 1, 4: 1, 5: 2, 6: 2, 7: 2, 8: 2}
    assert json.loads((run / "summary.json").read_text())["skipped_steps"] == 2
    weights = load_file(str(list_checkpoints(run)[-1] / "model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())  # the skipped updates never reached them


def test_resume_before_the_first_checkpoint_starts_over(tmp_path, base, capsys, monkeypatch):
    run = tmp_path / "run"
    monkeypatch.setenv(FAULT_ENV, "nan_grad:3")
    rc, _, err = cli(capsys, "train", *base, "train.steps=6", "train.ckpt_every=4", f"run.out={run}")
    assert rc == 1 and "no checkpoint yet" in one_error_line(err)
    assert [r["step"] for r in metrics(run)] == [1, 2] and not list_checkpoints(run)
    monkeypatch.delenv(FAULT_ENV)
    rc, out, _ = cli(capsys, "train", "--resume", str(run))
    assert rc == 0 and "starting from step 0" in out
    assert [r["step"] for r in metrics(run) if "train_loss" in r] == [1, 2, 3, 4, 5, 6]


# ---------------------------------------------------------------------------------------------- bad input


def _shards(folder: Path, train_ids: np.ndarray | None = None) -> list[str]:
    """External nanoGPT shards, read as GPT-2 ids (vocab 50257), as data.train_bin / data.val_bin."""
    folder.mkdir()
    ids = np.random.default_rng(0).integers(0, 1000, size=8 * 65)
    write_shard(folder / "train_000.bin", ids if train_ids is None else train_ids)
    write_shard(folder / "val_000.bin", ids)
    return [f"data.train_bin={folder}/train_*.bin", f"data.val_bin={folder}/val_*.bin", "data.tokenizer=gpt2"]


def _bad_shard(tmp: Path, edit) -> list[str]:
    args = _shards(tmp / "shards")
    path = tmp / "shards" / "train_000.bin"
    path.write_bytes(edit(path.read_bytes()))
    return args


def _text(tmp: Path, name: str, data: bytes) -> str:
    (tmp / name).write_bytes(data)
    return f"data.source={tmp / name}"


def _beyond_vocab(tmp: Path) -> list[str]:
    """50300 fits the padded embedding (50304 rows) but is no GPT-2 token: it must not train silently."""
    ids = np.random.default_rng(0).integers(0, 1000, size=8 * 65)
    ids[::65] = 50300
    return _shards(tmp / "shards", ids)


# id: (overrides from a tmp folder, regex the one error line must match, exit code: 1 data, 2 config)
BAD_INPUTS = {
    "empty-corpus": (lambda t: [_text(t, "empty.txt", b"\n \n")], r"empty\.txt: empty text file", 1),
    "bad-utf8-refused": (lambda t: [_text(t, "latin1.txt", "café au lait\n".encode("latin-1") * 50),
                                    "data.on_bad_utf8=error"],
                         r"latin1\.txt: invalid UTF-8 at byte offset 3", 1),
    "binary-file": (lambda t: [_text(t, "prog.txt", b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)) * 8)],
                    r"prog\.txt: not a text file \(a NUL byte at offset 7\)", 1),
    "mostly-undecodable": (lambda t: [_text(t, "blob.txt", "some text\n".encode("latin-1") * 20
                                            + bytes(range(0x80, 0x100)) * 4)],
                           r"blob\.txt: not a text file \(512 of 712 bytes, 71\.9%, are not UTF-8", 1),
    "shard-magic": (lambda t: _bad_shard(t, lambda b: b"\0" * 4 + b[4:]),
                    r"train_000\.bin: magic number 0, expected 20240520", 1),
    "shard-version": (lambda t: _bad_shard(t, lambda b: b[:4] + np.int32(7).tobytes() + b[8:]),
                      r"train_000\.bin: shard version 7", 1),
    "shard-truncated": (lambda t: _bad_shard(t, lambda b: b[:-100]),
                        r"train_000\.bin: header declares 520 tokens .* file has 1964 bytes; truncated", 1),
    "token-id-beyond-vocab": (_beyond_vocab, (r"train_000\.bin: token id 50300 at position \d+ is out of "
                                              r"range for vocab_size 50257"), 1),
    "unknown-key-in-toml": (lambda t: [_text(t, "c.toml", b"[optim]\nlearning_rate = 1e-3\n").replace(
        "data.source=", "--config=")], r"unknown config key 'optim\.learning_rate'", 2),
    "quoted-number-in-toml": (lambda t: [_text(t, "q.toml", b'[optim]\nlr = "3e-3"\n').replace(
        "data.source=", "--config=")], r"optim\.lr: expected a number, got the string '3e-3'; in TOML", 2),
    "mistyped-key": (lambda t: ["train.stepz=5"], r"unknown config key 'train\.stepz' \(did you mean", 2),
    "wrong-type": (lambda t: ["train.steps=many"], r"train\.steps: expected an integer, got 'many'", 2),
    "negative-lr": (lambda t: ["optim.lr=-0.001"], r"optim\.lr: must be positive and finite, got -0\.001", 2),
    "zero-steps": (lambda t: ["train.steps=0"], r"train\.steps: must be positive, got 0", 2),
    "zero-log-every": (lambda t: ["train.log_every=0"], r"train\.log_every: must be >= 1, got 0", 2),
    "topk-above-experts": (lambda t: ["model.moe.num_experts=4", "model.moe.top_k=8"],
                           r"model\.moe\.top_k: must be in \[1, num_experts=4\], got 8", 2),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_one_line_and_saves_nothing(tmp_path, base, capsys, case):
    setup, pattern, code = BAD_INPUTS[case]
    overrides = setup(tmp_path)
    options = [a for a in overrides if a.startswith("--")]
    run = tmp_path / "run"
    rc, _, err = cli(capsys, "train", *options, *base, f"data.dir={tmp_path / 'prepared'}", "train.steps=3",
                     f"run.out={run}", *(a for a in overrides if a not in options))
    line = one_error_line(err)
    assert re.search(pattern, line), line
    assert rc == code
    assert not list_checkpoints(run)
    if case != "token-id-beyond-vocab":  # that one is met by the first batch; the rest before run.out exists
        assert not run.exists()


def test_bad_utf8_is_replaced_and_counted(tmp_path, capsys):
    src = tmp_path / "mixed.txt"
    line = b"a good line, long enough that the bad bytes stay well under one percent\n"
    src.write_bytes((line * 3 + b"bad \xff\xfe bytes\n") * 40)  # 2 undecodable bytes per repeat
    rc, _, _ = cli(capsys, "prepare", f"data.source={src}", "data.tokenizer=byte",
                   f"data.dir={tmp_path / 'p'}")
    assert rc == 0
    meta = json.loads((tmp_path / "p" / "meta.json").read_text())
    assert meta["replaced_chars"] == 80 and meta["on_bad_utf8"] == "replace"


@pytest.mark.parametrize(("change", "phrase"), [
    (["model.d_model=64", "model.n_heads=2"], "resume: model.d_model changed from 128 to 64"),
    (["scale.strategy=unified"], "resume: scale."),
    (["train.batch_size=4"], "does not fit this config (loader state was saved for"),
    (["optim.name=muon"], "does not fit this config (optimizer state holds ['adamw']"),
], ids=["model", "strategy", "batch-size", "optimizer"])
def test_resume_with_changed_config_is_refused_untouched(tmp_path, base, capsys, change, phrase):
    run = tmp_path / "run"
    assert cli(capsys, "train", *base, "train.steps=4", "train.ckpt_every=2", f"run.out={run}")[0] == 0
    before = snapshot(run)
    rc, _, err = cli(capsys, "train", "--resume", str(run), *change, "train.steps=6")
    assert rc == 2 and phrase in one_error_line(err), err
    assert snapshot(run) == before  # config.toml included: a plain --resume still works afterwards


# ---------------------------------------------------------------------------------------------- safe loading


class _Payload:
    """Unpickling this calls ``open(marker, "w")``: harmless and visible, and just what an attack would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _forge(ckpt: Path, name: str, payload: object) -> None:
    """Replace one file by a pickle and re-sign the manifest, as whoever controls the folder could."""
    torch.save({"step": 8, "payload": payload}, ckpt / name)
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["sha256"][name] = sha256(ckpt / name)
    (ckpt / "manifest.json").write_text(json.dumps(manifest))


def test_pickle_payload_in_a_checkpoint_is_refused(tmp_path, base, capsys):
    run, marker = tmp_path / "run", tmp_path / "pwned"
    assert cli(capsys, "train", *base, "train.steps=8", "train.ckpt_every=4", f"run.out={run}")[0] == 0
    older, newest = list_checkpoints(run)
    _forge(newest, "state.pt", _Payload(marker))
    with pytest.raises(CheckpointError, match=r"state\.pt refused by the safe loader \(it would import io\."):
        load_checkpoint(newest)
    forged_weights = tmp_path / "forged"
    shutil.copytree(older, forged_weights)
    _forge(forged_weights, "model.safetensors", _Payload(marker))
    with pytest.raises(CheckpointError, match=r"model\.safetensors is unreadable"):
        load_checkpoint(forged_weights)
    assert not marker.exists()

    rc, out, _ = cli(capsys, "train", "--resume", str(run))  # falls back past the forged checkpoint
    assert rc == 0 and "state.pt refused by the safe loader" in out and f"resumed from {older}" in out
    assert not marker.exists()
    torch.load(run / "checkpoints" / "corrupt_step_00000008" / "state.pt", weights_only=False)
    assert marker.exists()  # the payload was live: only the safe loader kept it from running


# ---------------------------------------------------------------------------------------------- disk full


def _fail_second_call(real, error: Exception, partial: bool):
    """``real`` that raises ``error`` on its second call, after writing a few bytes if ``partial``."""
    calls = []

    def write(obj, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            if partial:
                Path(path).write_bytes(b"\0" * 4096)
            raise error
        return real(obj, path, *args, **kwargs)

    return write


@pytest.mark.parametrize("writer", ["state.pt", "model.safetensors"])
def test_disk_full_during_checkpoint_keeps_the_previous_one(tmp_path, base, capsys, monkeypatch, writer):
    if writer == "state.pt":
        full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        monkeypatch.setattr(torch, "save", _fail_second_call(torch.save, full, partial=True))
    else:  # what safetensors raises when the disk fills under it
        full = SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        monkeypatch.setattr(ckpt_mod, "save_file", _fail_second_call(ckpt_mod.save_file, full, partial=False))
    run = tmp_path / "run"
    rc, _, err = cli(capsys, "train", *base, "train.steps=8", "train.ckpt_every=4", f"run.out={run}")
    line = one_error_line(err)
    assert rc == 1
    assert f"could not write checkpoint {run / 'checkpoints' / 'step_00000008'}: " in line
    assert "No space left on device" in line and "the previous checkpoint step_00000004 is intact" in line
    assert steps_of(run) == [4]
    all_verify(run)
    assert not list((run / "checkpoints").glob(".tmp_*"))
    monkeypatch.undo()
    assert cli(capsys, "train", "--resume", str(run))[0] == 0 and steps_of(run) == [4, 8]


def _can_mount_tmpfs() -> bool:
    if not shutil.which("unshare"):
        return False
    probe = ["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"]
    return subprocess.run(probe, capture_output=True, check=False).returncode == 0


@pytest.mark.slow
def test_disk_full_on_a_real_tmpfs(tmp_path, base):
    """A 20 MiB tmpfs (in a private mount namespace) holds one 13 MiB checkpoint but not a second beside it.
    The run folder is copied out before the namespace, and the tmpfs with it, goes away."""
    if not _can_mount_tmpfs():
        pytest.skip("cannot mount a tmpfs here (needs unshare and user namespaces)")
    mnt, run = tmp_path / "mnt", tmp_path / "run"
    mnt.mkdir()
    train = [sys.executable, "-m", "scalevec", "train", *base, "train.steps=8", "train.ckpt_every=4",
             f"run.out={mnt / 'run'}"]
    script = (f"mount -t tmpfs -o size=20m tmpfs {mnt} || exit 99; {shlex.join(train)}; echo rc=$? >&2; "
              f"cp -a {mnt / 'run'} {run}")
    r = subprocess.run(["unshare", "-rm", "sh", "-c", script], env=_env(None), capture_output=True, text=True,
                       timeout=300, check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    err, rc = r.stderr.strip().rsplit("\n", 1)
    line = one_error_line(err)
    assert rc == "rc=1"
    assert f"could not write checkpoint {mnt / 'run' / 'checkpoints' / 'step_00000008'}: " in line
    assert "the disk is full: " in line and "the previous checkpoint step_00000004 is intact" in line
    assert steps_of(run) == [4]
    all_verify(run)
    assert not list((run / "checkpoints").glob(".tmp_*"))
