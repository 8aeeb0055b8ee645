"""Behaviour guard for refactors: fixed-seed 30-step runs whose per-step training losses must not change by a bit.

Bit-for-bit holds on the machine kind and torch build that recorded them; elsewhere CPU kernels round differently,
so the losses are compared within a tolerance. Record anew only when a change is meant to alter training, or, for
the clipped cases alone, when parameters are cut into other tensors while the unclipped twins still match (the
clipping norm rounds per tensor); say so in its commit: ``python tests/test_golden.py --record [CASE ...]`` (the
named cases only, the others kept).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from scalevec.config import load_config
from scalevec.train import train

pytestmark = pytest.mark.slow

GOLDEN = Path(__file__).parent / "golden" / "losses.json"
CLIPPED = {
    "baseline": ["model.preset=tiny", "scale.strategy=baseline"],
    "hg": ["model.preset=tiny", "scale.strategy=hg"],
    "dnp": ["model.preset=tiny", "scale.strategy=dnp"],
    "or": ["model.preset=tiny", "scale.strategy=or"],
    "unified": ["model.preset=tiny", "scale.strategy=unified"],
    "moe-tiny-unified": ["model.preset=moe-tiny", "scale.strategy=unified"],
}
# Unclipped twins: the clip factor's total norm depends on how the parameters are split into tensors (its sum
# runs per tensor), so only these pin the computation across a change of that split.
CASES = {**CLIPPED, **{f"{k}-noclip": [*v, "optim.grad_clip=0"] for k, v in CLIPPED.items()}}
COMMON = ["train.steps=30", "train.batch_size=4", "train.seq_len=64", "train.log_every=1", "train.eval_every=30",
          "train.ckpt_every=0", "train.threads=1", "train.compile=false", "train.progress=false",
          "train.scale_stats=false", "data.val_tokens=4096", "train.seed=0", "data.seed=0"]


def fingerprint() -> dict[str, str]:
    """What decides the rounding of a CPU run: torch's build, its CPU kernels' instruction set, the CPU."""
    model = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                  if ln.startswith("model name")), "") if Path("/proc/cpuinfo").exists() else ""
    return {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpu": model}


def losses(case: str, run_dir: Path) -> list[float]:
    train(load_config(None, [*CASES[case], *COMMON, f"run.out={run_dir}"]))
    rows = [json.loads(s) for s in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["train_loss"] for r in rows if "train_loss" in r]


@pytest.mark.parametrize("case", list(CASES))
def test_training_losses_match_the_recorded_ones_bit_for_bit(case, tmp_path):
    golden = json.loads(GOLDEN.read_text())
    want, got = golden["losses"][case], losses(case, tmp_path / case)
    assert len(got) == len(want) == 30
    if golden["fingerprint"] == fingerprint():
        diff = [(i + 1, w, g) for i, (w, g) in enumerate(zip(want, got)) if w != g]
        assert not diff, f"{case}: first differing (step, recorded, now) {diff[0]} of {len(diff)}"
    else:  # another CPU or torch build rounds otherwise; a changed computation still moves the losses far more
        torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=0, atol=2e-2)


if __name__ == "__main__" and sys.argv[1:2] == ["--record"]:
    import tempfile

    names = sys.argv[2:] or list(CASES)
    if unknown := [c for c in names if c not in CASES]:
        sys.exit(f"unknown golden case(s) {unknown}; known: {list(CASES)}")
    old = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {"losses": {}}
    if sys.argv[2:] and old.get("fingerprint") != fingerprint():
        sys.exit(f"{GOLDEN} was recorded on {old.get('fingerprint')}, this is {fingerprint()}: record every case")
    with tempfile.TemporaryDirectory() as tmp:
        new = {case: losses(case, Path(tmp) / case) for case in names}
    kept = {case: old["losses"][case] for case in CASES if case in old["losses"] and case not in new}
    record = {"fingerprint": fingerprint(), "losses": {c: new.get(c, kept.get(c)) for c in CASES if c in new or c in kept}}
    GOLDEN.write_text(json.dumps(record, indent=1) + "\n")
    print(f"recorded {names} in {GOLDEN}")
