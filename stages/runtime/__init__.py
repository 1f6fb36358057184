"""Runtimes: framework implementations of the ops layer (`ops.Ops`)."""

from __future__ import annotations

from .ops import Ops

RUNTIMES = ("paddle", "torch")


def load_runtime(name: str = "paddle", device: str = "cpu") -> Ops:
    """The ops layer for `name` on `device`; imports only that framework."""
    if name == "paddle":
        from .paddle_ops import PaddleOps

        return PaddleOps(device)
    if name == "torch":
        try:
            from .torch_ops import TorchOps
        except ImportError as e:
            raise RuntimeError(f"runtime 'torch' is not available: {e}") from e
        return TorchOps(device)
    raise ValueError(f"runtime must be one of {RUNTIMES}, got {name!r}")
