"""Fused ops composed from the basic ones: what a runtime without a fused
kernel for them runs (Paddle everywhere, Torch on the CPU).

A runtime binds these as methods; a runtime with a fused kernel (the Torch
runtime on a GPU, kernels/triton_decode.py) overrides them with one launch.
"""

from __future__ import annotations

from typing import Any

from .ops import Ops, Tensor


def add_rms_norm(ops: Ops, x: Tensor, residual: Tensor | None, weight: Tensor,
                 eps: float) -> tuple[Tensor, Tensor]:
    h = x if residual is None else ops.add(residual, x)
    return ops.rms_norm(h, weight, eps), h


def rope_and_cache_kv(ops: Ops, qkv: Tensor, num_q_heads: int, num_kv_heads: int, rope: Any, cache: Any,
                      plan: Any) -> Tensor:
    qk, v = ops.split(qkv, [num_q_heads + num_kv_heads, num_kv_heads], axis=1)
    q, k = ops.split(ops.rotary_embedding(qk, rope), [num_q_heads, num_kv_heads], axis=1)  # rotated together
    ops.write_kv_cache_(cache, k, v, plan)
    return q
