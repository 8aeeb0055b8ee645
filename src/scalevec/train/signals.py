"""Stopping a run between steps: SIGTERM (a scheduler's preemption, ``kill``) and the first Ctrl-C (SIGINT)
finish the step in flight, save a checkpoint and stop; a second Ctrl-C aborts at once."""

from __future__ import annotations

import signal
import threading
from typing import Self

from scalevec.train.errors import TrainingStopped

__all__ = ["STOP_SIGNALS", "StopSignal", "TrainingStopped"]

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignal:
    """Records a stop request instead of dying mid-step; the loop reads it between steps.

    Installed only in the main thread (Python delivers signals there) and restored afterwards, so library
    callers keep their handlers. A second SIGINT raises KeyboardInterrupt at once: a user who presses Ctrl-C
    twice wants out now, and checkpoints are atomic, so the newest complete one survives.
    """

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def __enter__(self) -> Self:
        if threading.current_thread() is threading.main_thread():
            for s in STOP_SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise KeyboardInterrupt
        if self.signum is None:
            self.signum = signum

    def __exit__(self, *exc) -> None:
        for s, previous in self._previous.items():
            signal.signal(s, previous)
        self._previous.clear()
