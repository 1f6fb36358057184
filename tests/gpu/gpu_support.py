"""Shared pieces of the GPU suite. Nothing here imports torch at import time:
the CPU suite loads Paddle in its process, and the two must not share one."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))  # tests/, for engine_test_support


def nvidia_driver_present() -> bool:
    """A cheap check before torch is imported: is there an NVIDIA driver at all?"""
    return os.path.exists("/proc/driver/nvidia/version") or os.path.exists("/dev/nvidiactl")


requires_gpu = pytest.mark.skipif(not nvidia_driver_present(), reason="needs an NVIDIA GPU (run on the GPU host)")


def cuda_torch():
    """torch, once it is known to see a CUDA device; skips the test otherwise."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch sees no CUDA device")
    return torch
