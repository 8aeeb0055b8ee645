"""Subcommands beside ``scalevec.cli``'s core ones: Hugging Face export and import, and sampling from a run."""

from __future__ import annotations

import argparse

from scalevec.commands import hf, sample


def register(sub: argparse._SubParsersAction) -> None:
    hf.register(sub)
    sample.register(sub)
