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


# OVERLAPD_GPU_TESTS_ON_CPU=1 runs the suite's daemon tests with `--device cpu`:
# device time is scarce, so every GPU path is first proven on the CPU through
# the same code (only the device differs).
ON_CPU_SWITCH = "OVERLAPD_GPU_TESTS_ON_CPU"


def on_cpu_requested() -> bool:
    return os.environ.get(ON_CPU_SWITCH) == "1"


def device_params() -> list:
    """pytest params for a test taking `device`: "gpu" where a GPU is, "cpu" when asked for."""
    return [
        pytest.param("gpu", marks=requires_gpu, id="gpu"),
        pytest.param("cpu", id="cpu", marks=pytest.mark.skipif(
            not on_cpu_requested(), reason=f"the GPU test on the CPU runs only with {ON_CPU_SWITCH}=1")),
    ]
