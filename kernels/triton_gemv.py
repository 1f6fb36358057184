"""A Triton matrix-vector product for batch-1 decode: y = x @ W.T with x [1, K].

Why: at batch 1 a decode step reads every weight once, so the step can be no
faster than the weights' bytes over the memory bandwidth; cuBLAS's kernels
for one row reach 1.6-2.8 TB/s on the 1B shape's matrices (the H100 profile
in docs/benchmarks.md), against ~4.2 TB/s of copy bandwidth on an H200. Here
each program streams a [BLOCK_N, BLOCK_K] tile of W per iteration (16-byte
loads along K, contiguous rows), multiplies by the matching slice of x in
float32 and reduces along K at the end. Short, wide matrices (o_proj,
down_proj: 2048 rows) are also split along K so that enough programs are in
flight; the split's float32 partial sums are added by a second small kernel
in a fixed order (no atomics: the result does not depend on timing, which
keeps seeded outputs reproducible).

Float32 accumulation of bf16 products, one rounding to the output dtype: the
same function as cuBLAS up to summation order (tests/gpu compare them within
a stated tolerance; tests/triton_kernels_check.py runs it under the
interpreter in float32).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_K = 512
TARGET_PROGRAMS = 528  # 4 per multiprocessor of an H100/H200 (132)


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, out_ptr, part_ptr, N, K, stride_w, k_per_split,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT: tl.constexpr, EVEN_K: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    k_start = pid_k * k_per_split
    w_rows = w_ptr + rows.to(tl.int64)[:, None] * stride_w
    for k0 in range(k_start, k_start + k_per_split, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        if EVEN_K:
            xv = tl.load(x_ptr + cols)
            w = tl.load(w_rows + cols[None, :], mask=row_ok[:, None], other=0.0)
        else:
            col_ok = cols < K
            xv = tl.load(x_ptr + cols, mask=col_ok, other=0.0)
            w = tl.load(w_rows + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        acc += w.to(tl.float32) * xv.to(tl.float32)[None, :]
    y = tl.sum(acc, axis=1)
    if SPLIT == 1:
        tl.store(out_ptr + rows, y.to(out_ptr.dtype.element_ty), mask=row_ok)
    else:
        tl.store(part_ptr + pid_k * N + rows, y, mask=row_ok)


@triton.jit
def _sum_splits_kernel(part_ptr, out_ptr, N, SPLIT: tl.constexpr, BLOCK: tl.constexpr):
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = rows < N
    acc = tl.zeros([BLOCK], tl.float32)
    for s in range(SPLIT):  # a fixed order: the same sum on every run
        acc += tl.load(part_ptr + s * N + rows, mask=ok, other=0.0)
    tl.store(out_ptr + rows, acc.to(out_ptr.dtype.element_ty), mask=ok)


def plan(n: int, k: int, block_n: int) -> int:
    """How many pieces K is split into: enough programs for the GPU, each piece
    a whole number of BLOCK_K tiles."""
    tiles = triton.cdiv(k, BLOCK_K)
    split = 1
    while triton.cdiv(n, block_n) * split < TARGET_PROGRAMS and tiles % (split * 2) == 0 and split < 16:
        split *= 2
    return split


def gemv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [1, K] @ weight[N, K].T -> [1, N] in x's dtype (weight contiguous)."""
    n, k = weight.shape
    assert x.shape == (1, k) and weight.stride(1) == 1, (x.shape, weight.shape)
    block_n = 16 if n >= 4096 else 8
    split = plan(n, k, block_n)
    out = torch.empty((1, n), dtype=x.dtype, device=x.device)
    part = torch.empty((split, n), dtype=torch.float32, device=x.device) if split > 1 else out
    k_per = triton.cdiv(triton.cdiv(k, BLOCK_K), split) * BLOCK_K
    _gemv_kernel[(triton.cdiv(n, block_n), split)](x, weight, out, part, n, k, weight.stride(0), k_per,
                                                   BLOCK_N=block_n, BLOCK_K=BLOCK_K, SPLIT=split,
                                                   EVEN_K=k % BLOCK_K == 0, num_warps=4)
    if split > 1:
        _sum_splits_kernel[(triton.cdiv(n, 1024),)](part, out, n, SPLIT=split, BLOCK=1024, num_warps=4)
    return out
