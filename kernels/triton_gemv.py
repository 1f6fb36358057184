"""Batch-1 matrix-vector products with a layer's glue fused in: y = f(x) @ W.T.

Why: at batch 1 a decode step reads every weight once, so it can be no faster
than the weights' bytes over the memory bandwidth (0.59 ms for the 1B shape
on an H200). cuBLAS's products alone reach that on the 525 MB lm_head, but
the 1B shape's layer matrices are 8-67 MB: a 6 us product of an 8 MB matrix
is mostly launch, ramp-up and tail, and each layer added four small kernels
around its products (two norms with the residual adds, SwiGLU, a split-K
sum), with a gap before each.

Here one kernel does what a chain did:
- `norm_linear`:        W @ rms_norm(r) * w_norm      (the norm in the prologue)
- `linear_add_`:        r += W @ x                     (the residual add in the epilogue)
- `swiglu_linear_add_`: r += W @ (silu(g) * u)         (SwiGLU in the prologue)
and each is launched with programmatic dependent launch (PDL, Hopper and
later) where the device has it: a kernel lets the next one launch as soon as
all of its programs have started, and the next one requests its first tile
of weights before it waits (griddepcontrol.wait) for its predecessor's
results. Weights never change during a step, so their fetch overlaps the
previous kernel's tail and the launch gap instead of following them. Every
kernel launched that way waits before it reads or writes any activation, so
the chain keeps stream order for everything but weight reads.

Rounding follows the kernels and ops they replace (kernels/triton_decode.py:
the normed vector and the SwiGLU activation are rounded to the activations'
dtype, the product is rounded before it is added to the residual), so the
fused path differs from F.linear only by float32 summation order. Products
accumulate in float32; short, wide matrices can also be split along K, the
float32 partial sums then added by a second small kernel in a fixed order
(no atomics: results do not depend on timing, which keeps seeded outputs
reproducible).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

TILE = 4096  # weights per program per iteration: 8 KB of bf16, 32 values a thread at 4 warps
TARGET_PROGRAMS = 384  # ~3 resident programs per multiprocessor of an H100/H200 (132)

PLAIN, NORM, SWIGLU = 0, 1, 2  # the prologue applied to x


@triton.jit
def _input(x_ptr, nw_ptr, cols, K, rstd, PROLOGUE: tl.constexpr, EVEN_K: tl.constexpr):
    """The product's input at `cols` as float32, after the prologue."""
    ok = cols < K
    dt = x_ptr.dtype.element_ty
    if PROLOGUE == 2:  # x = [gate | up], 2K wide
        if EVEN_K:
            g = tl.load(x_ptr + cols).to(tl.float32)
            u = tl.load(x_ptr + K + cols).to(tl.float32)
        else:
            g = tl.load(x_ptr + cols, mask=ok, other=0.0).to(tl.float32)
            u = tl.load(x_ptr + K + cols, mask=ok, other=0.0).to(tl.float32)
        act = (g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32)
        return (act * u).to(dt).to(tl.float32)
    if EVEN_K:
        x = tl.load(x_ptr + cols).to(tl.float32)
    else:
        x = tl.load(x_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    if PROLOGUE == 1:
        if EVEN_K:
            nw = tl.load(nw_ptr + cols).to(tl.float32)
        else:
            nw = tl.load(nw_ptr + cols, mask=ok, other=0.0).to(tl.float32)
        x = ((x * rstd).to(dt).to(tl.float32) * nw).to(dt).to(tl.float32)
    return x


@triton.jit
def _gemv_kernel(x_ptr, nw_ptr, w_ptr, out_ptr, part_ptr, N, K, stride_w, k_per_split, eps,
                 PROLOGUE: tl.constexpr, ADD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 BLOCK_X: tl.constexpr, SPLIT: tl.constexpr, EVEN_K: tl.constexpr, PDL: tl.constexpr):
    if PDL:
        gdc_launch_dependents()
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    w_rows = w_ptr + rows.to(tl.int64)[:, None] * stride_w
    c = tl.arange(0, BLOCK_K)
    # The first tile of weights is requested before the wait: it does not
    # depend on the previous kernel, so it streams during that kernel's tail.
    w = tl.load(w_rows + (k_start + c)[None, :], mask=row_ok[:, None] & ((k_start + c) < k_end)[None, :],
                other=0.0)
    if PDL:
        gdc_wait()
    rstd = 1.0
    if PROLOGUE == 1:  # the norm needs the whole vector; each program reads it (4-16 KB, from L2)
        xs = tl.arange(0, BLOCK_X)
        xa = tl.load(x_ptr + xs, mask=xs < K, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(xa * xa, axis=0) / K + eps)
    y = tl.zeros([BLOCK_N], tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        # the next tile is requested before this one is used (two tiles in flight)
        nxt = k0 + BLOCK_K + c
        w_next = tl.load(w_rows + nxt[None, :], mask=row_ok[:, None] & (nxt < k_end)[None, :], other=0.0)
        xv = _input(x_ptr, nw_ptr, k0 + c, K, rstd, PROLOGUE, EVEN_K)
        y += tl.sum(w.to(tl.float32) * xv[None, :], axis=1)
        w = w_next
    if SPLIT == 1:
        y = y.to(x_ptr.dtype.element_ty).to(tl.float32)  # rounded as a product in the activations' dtype
        if ADD:
            y += tl.load(out_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + rows, y.to(out_ptr.dtype.element_ty), mask=row_ok)
    else:
        tl.store(part_ptr + pid_k * N + rows, y, mask=row_ok)


@triton.jit
def _sum_splits_kernel(part_ptr, x_ptr, out_ptr, N, SPLIT: tl.constexpr, ADD: tl.constexpr, BLOCK: tl.constexpr,
                       PDL: tl.constexpr):
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = rows < N
    acc = tl.zeros([BLOCK], tl.float32)
    for s in range(SPLIT):  # a fixed order: the same sum on every run
        acc += tl.load(part_ptr + s * N + rows, mask=ok, other=0.0)
    acc = acc.to(x_ptr.dtype.element_ty).to(tl.float32)
    if ADD:
        acc += tl.load(out_ptr + rows, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows, acc.to(out_ptr.dtype.element_ty), mask=ok)


def plan(n: int, k: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, split): rows per program, the K tile, and how many
    pieces K is split into (enough programs to keep every multiprocessor
    streaming, each piece a whole number of tiles)."""
    # Fewer rows a program (more, shorter programs) streamed best on the H200 for the
    # products of a few tens of MB; the largest and smallest matrices took 4 (bench/gemv_bench.py).
    block_n = 2 if k >= 8192 or 8192 <= n <= 32768 else 4
    block_n = int(os.environ.get("OVERLAPD_GEMV_BLOCK_N", block_n))  # for bench sweeps
    block_k = min(int(os.environ.get("OVERLAPD_GEMV_TILE", TILE)) // block_n, triton.next_power_of_2(k))
    tiles = triton.cdiv(k, block_k)
    split = 1
    while triton.cdiv(n, block_n) * split < TARGET_PROGRAMS and tiles % (split * 2) == 0 and split < 16:
        split *= 2
    return block_n, block_k, split


def _launch(x: torch.Tensor, norm_w: torch.Tensor | None, weight: torch.Tensor, out: torch.Tensor,
            prologue: int, add: bool, eps: float, pdl: bool) -> torch.Tensor:
    n, k = weight.shape
    assert weight.stride(1) == 1 and x.is_contiguous() and out.is_contiguous(), (x.shape, weight.shape)
    block_n, block_k, split = plan(n, k)
    part = torch.empty((split, n), dtype=torch.float32, device=x.device) if split > 1 else out
    k_per = triton.cdiv(triton.cdiv(k, block_k), split) * block_k
    _gemv_kernel[(triton.cdiv(n, block_n), split)](
        x, norm_w if norm_w is not None else x, weight, out, part, n, k, weight.stride(0), k_per, eps,
        PROLOGUE=prologue, ADD=add, BLOCK_N=block_n, BLOCK_K=block_k,
        BLOCK_X=triton.next_power_of_2(k) if prologue == NORM else 16, SPLIT=split, EVEN_K=k % block_k == 0,
        PDL=pdl, num_warps=4, launch_pdl=pdl)
    if split > 1:
        _sum_splits_kernel[(triton.cdiv(n, 1024),)](part, x, out, n, SPLIT=split, ADD=add, BLOCK=1024, PDL=pdl,
                                                    num_warps=4, launch_pdl=pdl)
    return out


def gemv(x: torch.Tensor, weight: torch.Tensor, pdl: bool = False) -> torch.Tensor:
    """x [1, K] @ weight[N, K].T -> [1, N] in x's dtype (weight contiguous along K)."""
    n, k = weight.shape
    assert x.shape == (1, k), (x.shape, weight.shape)
    out = torch.empty((1, n), dtype=x.dtype, device=x.device)
    return _launch(x, None, weight, out, PLAIN, False, 0.0, pdl)


def norm_linear(r: torch.Tensor, norm_weight: torch.Tensor, eps: float, weight: torch.Tensor,
                pdl: bool = False, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """(rms_norm(r) * norm_weight) @ weight.T for r [1, K] -> [1, N], rounded to
    r's dtype and returned in `out_dtype` (r's by default; float32 logits)."""
    n, k = weight.shape
    assert r.shape == (1, k) and norm_weight.shape == (k,), (r.shape, norm_weight.shape, weight.shape)
    out = torch.empty((1, n), dtype=out_dtype or r.dtype, device=r.device)
    return _launch(r, norm_weight, weight, out, NORM, False, eps, pdl)


def linear_add_(r: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, pdl: bool = False) -> torch.Tensor:
    """r += x @ weight.T in place (r [1, N], x [1, K]); the product is rounded
    to r's dtype before the add, as `r + F.linear(x, weight)` rounds it."""
    n, k = weight.shape
    assert x.shape == (1, k) and r.shape == (1, n), (r.shape, x.shape, weight.shape)
    return _launch(x, None, weight, r, PLAIN, True, 0.0, pdl)


def swiglu_linear_add_(r: torch.Tensor, gate_up: torch.Tensor, weight: torch.Tensor,
                       pdl: bool = False) -> torch.Tensor:
    """r += (silu(gate) * up) @ weight.T in place, gate_up = [gate | up] [1, 2K]."""
    n, k = weight.shape
    assert gate_up.shape == (1, 2 * k) and r.shape == (1, n), (r.shape, gate_up.shape, weight.shape)
    return _launch(gate_up, None, weight, r, SWIGLU, True, 0.0, pdl)


def pdl_supported(device: torch.device) -> bool:
    """Programmatic dependent launch: compute capability 9.0 and later, unless OVERLAPD_PDL=0."""
    if device.type != "cuda" or os.environ.get("OVERLAPD_PDL", "1") == "0":
        return False
    return torch.cuda.get_device_capability(device)[0] >= 9


__all__ = ["gemv", "linear_add_", "norm_linear", "pdl_supported", "plan", "swiglu_linear_add_"]
