"""What a run writes as it goes: ``metrics.jsonl`` rows (and TensorBoard) for programs, progress for people.

On a terminal progress is a tqdm bar; written to a file or a pipe (a scheduler's log) it is one line per
logging interval, since a bar's redraws would fill the file with carriage returns.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from scalevec.config import ConfigError
from scalevec.fileio import atomic_write_text
from scalevec.train.errors import TrainingError


class Metrics:
    """``metrics.jsonl``: one JSON object per line; truncated to the resumed step so reruns never duplicate.

    Rows past the checkpoint a run resumes from were written by the crashed attempt; the resumed run writes
    them again. A last line cut short by the crash is dropped. The truncation replaces the file atomically.
    """

    def __init__(self, path: Path, enabled: bool, resume_step: int | None, tensorboard: Path | None = None):
        self.path, self.enabled = path, enabled
        self.tb = _tensorboard_writer(tensorboard) if enabled and tensorboard is not None else None
        if enabled and resume_step is not None and path.exists():
            keep = []
            for line in path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if row.get("step", 0) <= resume_step:
                    keep.append(line + "\n")
            atomic_write_text(path, "".join(keep))
        elif enabled:
            path.write_text("")

    def write(self, **row) -> None:
        if self.enabled:
            try:
                with open(self.path, "a") as f:
                    f.write(json.dumps(row) + "\n")
            except OSError as e:
                raise TrainingError(f"could not append to {self.path} ({e.strerror or e}); the newest "
                                    "checkpoint is intact") from e
            if self.tb is not None:
                for k, v in row.items():
                    if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                        self.tb.add_scalar(k, v, row["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None


def _tensorboard_writer(log_dir: Path):
    """A SummaryWriter; a resumed run appends to the same folder (TensorBoard shows the newest point per step)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise ConfigError("train.tensorboard=true needs the tensorboard package: pip install "
                          "'scalevec[tb]' (or set train.tensorboard=false)") from e
    return SummaryWriter(str(log_dir))


class Progress:
    """A tqdm bar when stderr is a terminal, else a log line per logged step on stdout; silent when disabled."""

    def __init__(self, enabled: bool, total: int, start: int, name: str, interactive: bool | None = None):
        self.total, self.start, self.t0 = total, start, time.perf_counter()
        self.bar = None
        self.lines = False
        if not enabled:
            return
        if sys.stderr.isatty() if interactive is None else interactive:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, desc=name, dynamic_ncols=True)
        else:
            self.lines = True

    def step(self, done: int, row: dict | None) -> None:
        """After step ``done``; ``row`` is its metrics row when the step was logged."""
        if self.bar is not None:
            if row is not None:
                self.bar.set_postfix(loss=f"{row['train_loss']:.3f}", tok_s=f"{row['tok_per_s']:,.0f}",
                                     refresh=False)
            self.bar.update(1)
        elif self.lines and row is not None:
            elapsed = time.perf_counter() - self.t0
            left = elapsed / max(done - self.start, 1) * (self.total - done)
            print(f"step {done}/{self.total}  loss {row['train_loss']:.4f}  lr {row['lr']:.2e}  "
                  f"{row['tok_per_s']:,.0f} tok/s  elapsed {clock(elapsed)}  left {clock(left)}", flush=True)

    def note(self, text: str, always: bool = False) -> None:
        """A line of its own, above the bar when there is one; ``always``: even with progress off."""
        if self.bar is not None:
            self.bar.write(text)
        elif self.lines or always:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def clock(seconds: float) -> str:
    """``42s``, ``3m05s``, ``2h07m``: durations as people read them."""
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"
