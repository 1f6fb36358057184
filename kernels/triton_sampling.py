"""A fused Triton kernel for the sampled path of stages/sampler.py, after the sort.

The ops path turns a row's sorted logits into a token with some fifteen
passes over [rows, vocab] tensors (gather, softmax, two cumsums, masks, a
count): at batch 64 and a 128k vocabulary each pass moves 32-64 MB. Here one
program per row reads the row's sorted logits (the sort's values, contiguous)
three times and writes one id:

1. the softmax normalizer of logits / temperature (the first value is the max);
2. the kept prefix: ranks below top_k whose probability mass before them is
   below top_p, its length and its mass;
3. the inverse CDF over the kept prefix at uniform * kept mass, and the id at
   that rank of the sort's order.

The same rule as the ops path (stages/sampler.py `_sample`), so for the same
uniforms both give the same token except where float32 summation order moves
a boundary by an ulp (the tests compare them on random rows: identical).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _sample_sorted_kernel(vals_ptr, order_ptr, temp_ptr, top_p_ptr, top_k_ptr, u_ptr, out_ptr, V, stride_v,
                          stride_o, BLOCK: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    t = tl.load(temp_ptr + r)
    t = tl.where(t > 0, t, 1.0)
    p = tl.load(top_p_ptr + r)
    k = tl.load(top_k_ptr + r)
    k = tl.where(k > 0, tl.minimum(k, V), V)
    u = tl.load(u_ptr + r)
    row = vals_ptr + r * stride_v
    m = tl.load(row).to(tl.float32) / t
    # 1. normalizer
    acc = tl.zeros([BLOCK], tl.float32)
    for start in range(0, V, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        x = tl.load(row + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
        acc += tl.exp(x / t - m)
    inv_z = 1.0 / tl.sum(acc, axis=0)
    # 2. the kept prefix (a prefix: the mass before a rank only grows)
    before_block = 0.0
    n_keep = 0
    total = 0.0
    for start in range(0, V, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        x = tl.load(row + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
        pr = tl.exp(x / t - m) * inv_z
        before = tl.cumsum(pr, axis=0) - pr + before_block
        keep = (offs < k) & (before < p) & (offs < V)
        n_keep += tl.sum(keep.to(tl.int32), axis=0)
        total += tl.sum(tl.where(keep, pr, 0.0), axis=0)
        before_block += tl.sum(pr, axis=0)
    # 3. inverse CDF over the kept prefix
    target = u * total
    below = 0
    cdf_block = 0.0
    for start in range(0, n_keep, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        keep = offs < n_keep
        x = tl.load(row + offs, mask=keep, other=float("-inf")).to(tl.float32)
        pr = tl.where(keep, tl.exp(x / t - m) * inv_z, 0.0)
        cdf = tl.cumsum(pr, axis=0) + cdf_block
        below += tl.sum(((cdf <= target) & keep).to(tl.int32), axis=0)
        cdf_block += tl.sum(pr, axis=0)
    idx = tl.minimum(below, n_keep - 1)  # rounding can put the target at the total
    tl.store(out_ptr + r, tl.load(order_ptr + r * stride_o + idx))


def sample_sorted(vals: torch.Tensor, order: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor,
                  top_k: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """int64 [R]: each row's token from its logits sorted in descending order
    (`vals` [R, V], any float dtype, and the sort's `order` [R, V] int64), with
    the row's temperature (0 is taken as 1: the caller keeps greedy rows'
    argmax), top_p, top_k (0 = off) and uniform in [0, 1)."""
    rows, v = vals.shape
    out = torch.empty(rows, dtype=torch.int64, device=vals.device)
    if rows:
        _sample_sorted_kernel[(rows,)](vals, order, temperature, top_p, top_k, uniform, out, v, vals.stride(0),
                                       order.stride(0), BLOCK=2048, num_warps=8)
    return out
