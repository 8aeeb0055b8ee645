"""Checkpoints: weights as safetensors, everything else through ``torch.load(weights_only=True)``.

A checkpoint is a folder ``RUN_DIR/checkpoints/step_XXXXXXXX`` holding ``model.safetensors``, ``state.pt``
(optimizer, RNG, data position, counters) and ``manifest.json`` (sha256 of both). It is written into a temporary
folder and renamed into place, so a crash mid-write never leaves a folder that looks complete, and the previous
checkpoint survives. Loading verifies the checksums; a corrupt checkpoint is reported and skipped.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

CKPT_DIR = "checkpoints"
FILES = ("model.safetensors", "state.pt")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message is one line naming it and the problem."""


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def unique_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop aliases (tied embeddings) that safetensors refuses; loading restores them through the module."""
    seen: set[int] = set()
    out = {}
    for k, v in state.items():
        key = v.untyped_storage().data_ptr() if v.numel() else id(v)
        if key in seen:
            continue
        seen.add(key)
        out[k] = v.detach().contiguous()
    return out


def save_checkpoint(run_dir: Path, step: int, model_state: dict, state: dict, keep: int) -> Path:
    """Write atomically, then prune to the newest ``keep`` checkpoints. Raises CheckpointError on failure."""
    root = Path(run_dir) / CKPT_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp_step_{step:08d}_{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        save_file(unique_tensors(model_state), str(tmp / FILES[0]), metadata={"step": str(step)})
        torch.save(state, tmp / FILES[1])
        manifest = {"step": step, "sha256": {f: sha256(tmp / f) for f in FILES}}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        for f in (*FILES, "manifest.json"):
            with open(tmp / f, "rb") as fh:
                os.fsync(fh.fileno())
        if final.exists():  # re-saving the same step (e.g. after a resume): replace it whole
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(root)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"could not write checkpoint {final}: {e.strerror or e}") from None
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    root = Path(run_dir) / CKPT_DIR
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_"))


def verify(ckpt: Path) -> None:
    mf = ckpt / "manifest.json"
    if not mf.is_file():
        raise CheckpointError(f"checkpoint {ckpt} has no manifest.json (incomplete write)")
    try:
        manifest = json.loads(mf.read_text())
        expected = manifest["sha256"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise CheckpointError(f"checkpoint {ckpt}: manifest.json is unreadable") from None
    for f in FILES:
        p = ckpt / f
        if not p.is_file():
            raise CheckpointError(f"checkpoint {ckpt}: {f} is missing")
        if sha256(p) != expected.get(f):
            raise CheckpointError(f"checkpoint {ckpt}: {f} fails its sha256 check (truncated or corrupted)")


@dataclass
class Loaded:
    path: Path
    model_state: dict[str, torch.Tensor]
    state: dict
    skipped: list[str]  # one line per newer checkpoint that was corrupt


def load_latest(run_dir: Path) -> Loaded | None:
    """The newest checkpoint that verifies; corrupt newer ones are listed in ``skipped``."""
    skipped = []
    for ckpt in reversed(list_checkpoints(run_dir)):
        try:
            return Loaded(ckpt, *load_checkpoint(ckpt), skipped=skipped)
        except CheckpointError as e:
            skipped.append(str(e))
    if skipped:
        raise CheckpointError(f"no valid checkpoint in {run_dir}: {skipped[-1]}")
    return None


def load_checkpoint(ckpt: Path) -> tuple[dict[str, torch.Tensor], dict]:
    verify(ckpt)
    try:
        model_state = load_file(str(ckpt / FILES[0]))
    except Exception as e:  # safetensors raises its own error types on malformed headers
        raise CheckpointError(f"checkpoint {ckpt}: model.safetensors is unreadable ({e})") from None
    try:
        state = torch.load(ckpt / FILES[1], weights_only=True, map_location="cpu")
    except Exception as e:  # pickle payloads with non-allowlisted globals land here
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint {ckpt}: state.pt refused by the safe loader ({first})") from None
    return model_state, state
