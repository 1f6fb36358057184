"""tests/gpu: collected everywhere, run only where a CUDA device is visible."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def _cache_dir(tmp_path_factory: pytest.TempPathFactory):
    # The tiny checkpoint is created under a temp dir, never the user's cache.
    old = os.environ.get("OVERLAPD_CACHE_DIR")
    os.environ["OVERLAPD_CACHE_DIR"] = str(tmp_path_factory.mktemp("overlapd-gpu-cache"))
    yield
    if old is None:
        os.environ.pop("OVERLAPD_CACHE_DIR", None)
    else:
        os.environ["OVERLAPD_CACHE_DIR"] = old


@pytest.fixture(scope="session")
def torch():
    """torch on a visible CUDA device (the test skips without one); imported only when asked for."""
    from gpu_support import cuda_torch

    return cuda_torch()
