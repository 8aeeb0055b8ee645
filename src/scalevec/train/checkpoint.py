"""Checkpoints: weights as safetensors, everything else through ``torch.load(weights_only=True)``.

A checkpoint is a folder ``RUN_DIR/checkpoints/step_XXXXXXXX`` holding ``model.safetensors``, ``state.pt``
(optimizer, RNG, data position, counters) and ``manifest.json`` (sha256 of both). It is written into a
temporary folder ``.tmp_*``, fsynced and renamed into place, so a crash mid-write never leaves a ``step_*``
folder that looks complete, and the previous checkpoint survives. Old checkpoints are pruned (and a checkpoint
replaced) by renaming them to ``.tmp_*`` first, so a crash mid-delete never leaves a half-deleted ``step_*``
folder either. ``.tmp_*`` folders are leftovers of a crash, removed by the next save or resume. Loading
verifies the checksums; a corrupt checkpoint is reported in one line and skipped. See docs/reliability.md.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from scalevec.fileio import sha256_file
from scalevec.typed_config import ConfigError

CKPT_DIR = "checkpoints"
FILES = ("model.safetensors", "state.pt")
MANIFEST = "manifest.json"
TMP_PREFIX = ".tmp_"  # incomplete writes and checkpoints being deleted; never read, removed on the next save
CORRUPT_PREFIX = "corrupt_"  # corrupt checkpoints set aside by a resume, kept for inspection
SUPERSEDED_PREFIX = "superseded_"  # checkpoints newer than the one a --from-step resume continues from
FAULT_ENV = "SCALEVEC_FAULT"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message is one line naming it and the problem."""


def injected_fault(kind: str) -> tuple[int, str] | None:
    """Test-only fault injection, inert unless ``$SCALEVEC_FAULT`` is set; (step, argument) of ``kind``.

    ``SCALEVEC_FAULT`` holds comma-separated ``kind:STEP[:ARG]`` items. ``kill_in_ckpt:STEP[:STAGE]`` SIGKILLs
    the process while it saves the checkpoint of STEP, after STAGE (``model.safetensors`` by default, then
    ``state.pt``, ``manifest.json``, ``rename``, ``prune``); ``sigint_in_ckpt:STEP[:STAGE]`` sends it two
    SIGINTs there (``state.pt`` by default); the trainer reads ``nan_grad:STEP[:ROLE]`` and
    ``inf_loss:STEP``. Read once per checkpoint or run, never per step.
    """
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return None
    for item in spec.split(","):
        name, _, rest = item.strip().partition(":")
        if name == kind:
            step, _, arg = rest.partition(":")
            return int(step), arg
    return None


def _kill_hook(step: int) -> Callable[[str], None]:
    """The checkpoint faults of ``step``: ``kill_in_ckpt`` (SIGKILL) and ``sigint_in_ckpt`` (two SIGINTs, a
    user pressing Ctrl-C twice: the first asks for a stop, the second aborts the save)."""
    faults = {}
    for kind, default in (("kill_in_ckpt", FILES[0]), ("sigint_in_ckpt", FILES[1])):
        fault = injected_fault(kind)
        if fault is not None and fault[0] == step:
            faults[fault[1] or default] = kind

    def hit(stage: str) -> None:
        kind = faults.get(stage)
        if kind == "kill_in_ckpt":
            os.kill(os.getpid(), signal.SIGKILL)
        elif kind == "sigint_in_ckpt":
            for _ in range(2):
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.2)  # the handler runs between bytecodes; the sleep lets it

    return hit


def _fsync(path: Path) -> None:
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


def _move_aside(path: Path) -> Path:
    """Rename a folder to ``.tmp_del_*`` before deleting it, so that no crash can leave it half deleted under
    its own name; the next save removes what a crash left."""
    aside = path.with_name(f"{TMP_PREFIX}del_{path.name}")
    shutil.rmtree(aside, ignore_errors=True)
    os.rename(path, aside)
    return aside


def remove_stale(run_dir: Path) -> int:
    """Remove the ``.tmp_*`` leftovers of crashed writes and deletes; returns how many there were."""
    root = Path(run_dir) / CKPT_DIR
    stale = list(root.glob(f"{TMP_PREFIX}*")) if root.is_dir() else []
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return len(stale)


def _tensor_bytes(obj: object) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.nelement() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def _write_error(e: BaseException, run_dir: Path, final: Path, needed: int) -> CheckpointError:
    """One line: what failed, whether the disk is full, and the checkpoint a resume would use.

    Called before the partial write is removed, so the free space is what the write ran into. A full disk
    surfaces as OSError, as SafetensorError or as torch's "unexpected pos" RuntimeError; the free space
    names the cause whatever the type.
    """
    reason = e.strerror if isinstance(e, OSError) and e.strerror else _first_line(e)
    try:
        free = shutil.disk_usage(final.parent).free
    except OSError:
        free = needed
    if free < needed:
        reason = (f"the disk is full: {free / 2**20:.1f} MiB free, about {needed / 2**20:.1f} MiB needed "
                  f"({reason})")
    prev = list_checkpoints(run_dir)
    kept = f"the previous checkpoint {prev[-1].name} is intact" if prev else "no earlier checkpoint exists"
    return CheckpointError(f"could not write checkpoint {final}: {reason}; {kept}")


def save_checkpoint(run_dir: Path, step: int, model_state: dict, state: dict, keep: int,
                    pinned: bool = False) -> Path:
    """Write atomically, then prune to the newest ``keep`` checkpoints that are not pinned (a pinned one, such
    as WSD's last checkpoint before the decay, is never pruned). Raises CheckpointError on failure."""
    root = Path(run_dir) / CKPT_DIR
    root.mkdir(parents=True, exist_ok=True)
    remove_stale(run_dir)
    final = root / f"step_{step:08d}"
    tmp = root / f"{TMP_PREFIX}{final.name}_{os.getpid()}"
    fault = _kill_hook(step)
    replaced = None
    try:
        tmp.mkdir()
        save_file(unique_tensors(model_state), str(tmp / FILES[0]), metadata={"step": str(step)})
        fault(FILES[0])
        torch.save(state, tmp / FILES[1])
        fault(FILES[1])
        manifest = {"step": step, "sha256": {f: sha256_file(tmp / f) for f in FILES}, "pinned": pinned}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        fault(MANIFEST)
        for f in (*FILES, MANIFEST):
            _fsync(tmp / f)
        _fsync(tmp)
        if final.exists():  # the same step saved again: replace it whole
            replaced = _move_aside(final)
        os.rename(tmp, final)
        _fsync(root)
    except Exception as e:  # a full disk surfaces as OSError, SafetensorError or torch's RuntimeError
        if replaced is not None and not final.exists():
            os.rename(replaced, final)
        error = _write_error(e, run_dir, final, _tensor_bytes(model_state) + _tensor_bytes(state))
        shutil.rmtree(tmp, ignore_errors=True)
        raise error from e
    if replaced is not None:
        shutil.rmtree(replaced, ignore_errors=True)
    fault("rename")
    for old in [c for c in list_checkpoints(run_dir) if not is_pinned(c)][:-keep]:
        aside = _move_aside(old)
        fault("prune")
        shutil.rmtree(aside, ignore_errors=True)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    root = Path(run_dir) / CKPT_DIR
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_"))


def is_pinned(ckpt: Path) -> bool:
    try:
        return bool(json.loads((ckpt / MANIFEST).read_text()).get("pinned"))
    except (OSError, ValueError, AttributeError):
        return False


def step_of(ckpt: Path) -> int:
    return int(ckpt.name.removeprefix("step_"))


def verify(ckpt: Path) -> None:
    mf = ckpt / MANIFEST
    if not mf.is_file():
        raise CheckpointError(f"checkpoint {ckpt} has no {MANIFEST} (incomplete write)")
    try:
        manifest = json.loads(mf.read_text())
        expected = manifest["sha256"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        raise CheckpointError(f"checkpoint {ckpt}: {MANIFEST} is unreadable") from None
    for f in FILES:
        p = ckpt / f
        if not p.is_file():
            raise CheckpointError(f"checkpoint {ckpt}: {f} is missing")
        if sha256_file(p) != expected.get(f):
            raise CheckpointError(f"checkpoint {ckpt}: {f} fails its sha256 check (truncated or corrupted)")


@dataclass
class Loaded:
    path: Path
    model_state: dict[str, torch.Tensor]
    state: dict
    skipped: list[str]  # one line per newer checkpoint that was corrupt
    corrupt: list[Path] = field(default_factory=list)  # those checkpoints, newest first


def load_latest(run_dir: Path) -> Loaded | None:
    """The newest checkpoint that verifies; corrupt newer ones are listed in ``skipped``."""
    skipped, corrupt = [], []
    for ckpt in reversed(list_checkpoints(run_dir)):
        try:
            return Loaded(ckpt, *load_checkpoint(ckpt), skipped=skipped, corrupt=corrupt)
        except CheckpointError as e:
            skipped.append(str(e))
            corrupt.append(ckpt)
    if skipped:
        raise CheckpointError(f"no valid checkpoint in {run_dir}: all {len(skipped)} are corrupt, the "
                              f"newest: {skipped[0]}")
    return None


def load_step(run_dir: Path, step: int) -> Loaded:
    """The checkpoint of ``step`` (``--resume --from-step``), verified; a missing one names those kept."""
    ckpt = Path(run_dir) / CKPT_DIR / f"step_{step:08d}"
    if not ckpt.is_dir():
        kept = ", ".join(str(step_of(c)) for c in list_checkpoints(run_dir)) or "none"
        raise ConfigError(f"--from-step {step}: {run_dir} has no checkpoint of step {step}; "
                              f"checkpoints kept: {kept}")
    return Loaded(ckpt, *load_checkpoint(ckpt), skipped=[])


def supersede(run_dir: Path, step: int) -> list[Path]:
    """Rename the checkpoints newer than ``step`` to ``superseded_step_*``, so that a later plain ``--resume``
    cannot jump back to the trajectory a ``--from-step`` resume left; kept, like corrupt ones, for inspection."""
    return [set_aside(c, SUPERSEDED_PREFIX) for c in list_checkpoints(run_dir) if step_of(c) > step]


def set_aside(ckpt: Path, prefix: str = CORRUPT_PREFIX) -> Path:
    """Rename a checkpoint ``corrupt_step_*`` (or another prefix): out of the way of resume and pruning,
    kept to study."""
    aside = ckpt.with_name(prefix + ckpt.name)
    if aside.exists():
        shutil.rmtree(aside)
    os.rename(ckpt, aside)
    return aside


def load_checkpoint(ckpt: Path) -> tuple[dict[str, torch.Tensor], dict]:
    verify(ckpt)
    try:
        model_state = load_file(str(ckpt / FILES[0]))
    except Exception as e:  # safetensors raises its own error types on malformed headers
        raise CheckpointError(f"checkpoint {ckpt}: {FILES[0]} is unreadable ({_first_line(e)})") from e
    try:
        state = torch.load(ckpt / FILES[1], weights_only=True, map_location="cpu")
    except Exception as e:  # pickle payloads with non-allowlisted globals land here
        reason = _unpickle_reason(e)
        raise CheckpointError(f"checkpoint {ckpt}: {FILES[1]} refused by the safe loader ({reason})") from e
    return model_state, state


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _unpickle_reason(e: BaseException) -> str:
    """torch's weights-only refusal is a page of advice; the line that matters names the global."""
    found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
    if found:
        return f"it would import {found[1]}: a pickle payload, not plain tensors and containers"
    return _first_line(e)
