"""Shared fixtures."""

from __future__ import annotations

import os
import shutil

import pytest

from scalevec import cpu_kernels


@pytest.fixture
def cpu_kernel() -> None:
    """The hand-written CPU kernels, built: required wherever a C++ compiler exists (a failed build there is a
    failure, not a skip)."""
    if os.environ.get(cpu_kernels.ENV, "1") == "0":
        pytest.skip(f"{cpu_kernels.ENV}=0 switches the CPU kernels off")
    if not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        pytest.skip("no C++ compiler: the CPU kernels cannot be built here")
    assert cpu_kernels.load(), "the CPU kernels did not build (see the RuntimeWarning)"
