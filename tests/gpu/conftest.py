"""tests/gpu: collected everywhere, run only where a CUDA device is visible."""

from __future__ import annotations

import gpu_support  # noqa: F401  (puts tests/ on sys.path; imports no framework)
import pytest
from engine_test_support import tiny_cache  # noqa: F401


@pytest.fixture(scope="session", autouse=True)
def _cache_dir(tiny_cache: str) -> None:
    """The tiny checkpoint is created under a temp dir, never the user's cache."""


@pytest.fixture(scope="session")
def torch():
    """torch on a visible CUDA device (the test skips without one); imported only when asked for."""
    from gpu_support import cuda_torch

    return cuda_torch()
