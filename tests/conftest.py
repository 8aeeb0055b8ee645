"""Shared fixtures."""

from __future__ import annotations

import os
import shutil

import pytest

from scalevec.ops import dnp_swiglu as kernel_ops


@pytest.fixture
def cpu_kernel() -> None:
    """The hand-written CPU kernels, built: required wherever a C++ compiler exists (a failed build there is a
    failure, not a skip)."""
    if os.environ.get(kernel_ops.ENV, "1") == "0":
        pytest.skip(f"{kernel_ops.ENV}=0 switches the CPU kernels off")
    if not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        pytest.skip("no C++ compiler: the CPU kernels cannot be built here")
    assert kernel_ops.load(), "the CPU kernels did not build (see the RuntimeWarning)"
