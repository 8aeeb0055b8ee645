"""The ways a training run stops early, each reported by the CLI as one line."""

from __future__ import annotations

import signal


class TrainingError(RuntimeError):
    """A run that must stop (divergence, a broken resume); one line naming the problem."""


class TrainingStopped(TrainingError):
    """A stop signal arrived (SIGTERM from a scheduler or ``kill``, or a first Ctrl-C): the run saved a
    checkpoint at the step it had finished and stopped; ``--resume`` continues it exactly."""

    def __init__(self, message: str, signum: int = signal.SIGTERM):
        super().__init__(message)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's code for "terminated by" that signal: 143, or 130 for Ctrl-C
