"""Where the Torch runtime's Triton kernels load (kernels/triton_*.py), and the
one-token path's fused products as the model sees them."""

from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import Any, Callable

import torch

from ..model.tiny import cache_root
from .ops import Tensor


class FusedProducts:
    """kernels/triton_gemv.py's batch-1 products with a layer's glue fused in
    (one-token steps: LlamaModel.forward uses them where an ops object has them)."""

    __slots__ = ("_k", "pdl")

    def __init__(self, kernels: ModuleType, pdl: bool) -> None:
        self._k, self.pdl = kernels, pdl

    def norm_linear(self, r: Tensor, norm_weight: Tensor, eps: float, weight: Tensor,
                    out_dtype: str | None = None) -> Tensor:
        """(rms_norm(r) * norm_weight) @ weight.T, rounded to r's dtype, in `out_dtype`
        (an ops dtype name, which is torch's)"""
        return self._k.norm_linear(r, norm_weight, eps, weight, self.pdl,
                                   None if out_dtype is None else getattr(torch, out_dtype))

    def linear_add_(self, r: Tensor, x: Tensor, weight: Tensor) -> None:
        """r += x @ weight.T, in place"""
        self._k.linear_add_(r, x, weight, self.pdl)

    def swiglu_linear_add_(self, r: Tensor, gate_up: Tensor, weight: Tensor) -> None:
        """r += silu_and_mul(gate_up) @ weight.T, in place"""
        self._k.swiglu_linear_add_(r, gate_up, weight, self.pdl)


def fused_kernels(cuda: bool) -> ModuleType | None:
    """kernels/triton_decode.py where it can run: on a GPU with Triton
    installed, unless OVERLAPD_FUSED=0; OVERLAPD_FUSED=1 also takes it on the
    CPU (tests, under TRITON_INTERPRET=1)."""
    want = os.environ.get("OVERLAPD_FUSED", "")
    if want == "0" or not (cuda or want == "1"):
        return None
    # Compiled kernels are cached on disk; under the systemd unit the home
    # directory is hidden (ProtectHome), so the cache goes to overlapd's own.
    os.environ.setdefault("TRITON_CACHE_DIR", str(cache_root() / "triton"))
    try:
        return importlib.import_module("overlapd.kernels.triton_decode")
    except ImportError:
        if want == "1":
            raise
        return None


def fused_entry(fused: ModuleType | None, module: str, name: str) -> Callable[..., Any] | None:
    """kernels/<module>.py's `name` wherever the decode kernels load."""
    if fused is None:
        return None
    return getattr(importlib.import_module(f"overlapd.kernels.{module}"), name)
