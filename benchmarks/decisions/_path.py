"""Puts ``benchmarks/`` on the import path, so a decision script shares the core's harness."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
