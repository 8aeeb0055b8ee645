"""Shared pieces of the data pipeline: its error type and the cache folder."""

from __future__ import annotations

import os
from pathlib import Path


class DataError(ValueError):
    """A problem with the input data (a missing, empty, corrupt or inconsistent file), in one line."""


def cache_dir() -> Path:
    """``$SCALEVEC_CACHE`` if set, else ``~/.cache/scalevec``; created on first use."""
    env = os.environ.get("SCALEVEC_CACHE")
    path = Path(env).expanduser() if env else Path.home() / ".cache" / "scalevec"
    path.mkdir(parents=True, exist_ok=True)
    return path


