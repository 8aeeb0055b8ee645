"""Shared pieces of the GPU check (``gpu.sh``): the device, where results go, the carried data, and one phase's
JSON, rewritten each time a part of the phase finishes.

``SCALEVEC_GPU_SMOKE=1`` swaps every size for a tiny one and the device for CPU: the same code, run by the test
suite (``tests/test_gpu_script.py``), so nothing fails on the GPU for a reason a CPU could have shown.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import math
import os
import time
from pathlib import Path

import torch
from harness import Shape

from scalevec.config import DataConfig
from scalevec.fileio import atomic_write_json

SMOKE = os.environ.get("SCALEVEC_GPU_SMOKE") == "1"
DEVICE = "cpu" if SMOKE else "cuda"
OUT = Path(os.environ.get("OUT") or "runs/gpu")
DATA = Path(os.environ.get("SCALEVEC_GPU_DATA") or ".cache/gpu/data")
STRATEGIES = ("baseline", "unified")
VAL_TOKENS = 65536 if not SMOKE else 1024  # the held-out set each evaluation reads (the trainer's default)
# Dense bf16 tensor-core peaks from NVIDIA's datasheets (SXM; the PCIe H100 is lower), for MFU beside the
# measured matmul peak.
DATASHEET_BF16 = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12}


def pick(real, smoke):
    """The GPU's value, or the smoke test's."""
    return smoke if SMOKE else real


def shape(preset: str, batch: int, seq: int) -> Shape:
    """A benchmark shape at ``preset``; the smoke test's keeps two layers of it."""
    return Shape(preset, preset, batch, seq, layers=pick(0, 2))


def device_name() -> str:
    return torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"


def datasheet_peak(name: str) -> float | None:
    return next((v for k, v in DATASHEET_BF16.items() if k in name), None)


def setup() -> None:
    """As the trainer sets a CUDA device up: TF32 for fp32 matmuls."""
    if DEVICE == "cuda":
        torch.set_float32_matmul_precision("high")


@contextlib.contextmanager
def ieee_fp32():
    """fp32 matmuls without TF32 inside the block (comparisons against a CPU reference)."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def release() -> None:
    """Frees what deleted models left behind, so the next one is measured alone."""
    gc.collect()
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


def data_config() -> DataConfig:
    """The carried shards as existing shards: nothing is prepared or fetched on a machine without network."""
    return DataConfig(train_bin=str(DATA / "train_*.bin"), val_bin=str(DATA / "val_*.bin"))


def data_overrides() -> list[str]:
    c = data_config()
    return [f"data.train_bin={c.train_bin}", f"data.val_bin={c.val_bin}", f"data.val_tokens={VAL_TOKENS}"]


def finite(x: float | None) -> float | None:
    """JSON has no NaN or infinity: those become null."""
    return x if x is None or math.isfinite(x) else None


class Result(dict):
    """One phase's JSON (``$OUT/gpu_<phase>.json``), saved whenever a part finishes: a phase stopped by its
    timeout keeps every part it finished, with ``complete`` false."""

    def __init__(self, phase: str, **fields):
        super().__init__(phase=phase, complete=False, smoke=SMOKE, device=device_name(), torch=torch.__version__,
                         started=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), **fields)
        self.t0 = time.perf_counter()
        self.path = OUT / f"gpu_{phase}.json"

    def save(self) -> None:
        self["wall_s"] = round(time.perf_counter() - self.t0, 1)
        OUT.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.path, self)

    def done(self) -> None:
        self["complete"] = True
        self.save()
