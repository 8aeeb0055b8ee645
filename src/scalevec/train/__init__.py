"""Training: the loop, checkpoints, distribution, and loading finished runs."""

from scalevec.train.errors import TrainingError
from scalevec.train.run import load_run, write_run
from scalevec.train.trainer import train

__all__ = ["TrainingError", "load_run", "train", "write_run"]
