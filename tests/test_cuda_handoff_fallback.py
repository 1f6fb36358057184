"""kernels/cuda_handoff.py without CUDA: every entry point says so, and callers
keep their CPU path (tests/gpu covers the real thing on the GPU host)."""

from __future__ import annotations

import os

import pytest

from overlapd.kernels import cuda_handoff

pytestmark = pytest.mark.skipif(os.path.exists("/proc/driver/nvidia/version"),
                                reason="an NVIDIA driver is present: tests/gpu covers this host")


def test_without_cuda_nothing_is_queued_and_callers_fall_back() -> None:
    assert cuda_handoff.native() is None
    fd = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        assert cuda_handoff.signal_after(0, fd) is False  # the execute stage then signals itself
        assert cuda_handoff.spin_waiter(fd) is None
        with pytest.raises(BlockingIOError):
            os.eventfd_read(fd)  # nothing was written
    finally:
        os.close(fd)
    with pytest.raises(RuntimeError, match="_cuda extension"):
        cuda_handoff.PinnedCopies()
