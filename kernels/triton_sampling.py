"""Seeded top-k / top-p / temperature sampling on a GPU without sorting the vocabulary.

Why: the ops path (stages/sampling/sampler.py `_sample`) sorts every row; at batch 64
and a 128k vocabulary that sort alone took 413 us on an H200 (bf16 keys),
a quarter of a decode step. Here no row is sorted:

1. stats: per chunk of a row, the max of logits / temperature and the sum of
   exp(. - max) (an online softmax's partials);
2. search (4 passes for bf16-valued logits, 8 for float32): the kept set is
   {tokens whose mass above them is < top_p and count above them is <
   top_k}, i.e. every token whose order key is above a threshold w; each pass
   evaluates "mass above c >= top_p or count above c >= top_k" at 16
   candidate keys c and narrows w's range 16-fold (a radix select by value);
3. sample: an exponential race over the kept tokens, argmax of logit /
   temperature + Gumbel noise, whose noise for token j is a fixed integer hash
   of the row's seed state and j (`race_uniform`): an exact draw from the
   kept, renormalized distribution that depends only on the row's logits and
   seed state, never on the batch;
4. finish: the first best over the row's chunks.

Every pass splits each row over several programs (enough for the GPU at
batch 1 too); programs write partial sums that the next pass reads back in a
fixed order, so results do not depend on timing (no atomics).

Differences from the ops path, by design: ties at the top-p / top-k boundary
are kept or dropped together (a threshold by value, not by sorted rank), and
the token is drawn by the race, not by the inverse CDF of the sorted row: the
same distribution, another token for the same seed. Graph and eager steps,
overlap and sync all run this same code on a GPU, so they agree exactly.
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

BLOCK = 1024
TARGET_PROGRAMS = 1024
_H1, _H2 = 0x9E3779B1, 0x85EBCA77  # odd multipliers of the race's hash
_HMUL = 0x45D9F3B


@triton.jit
def _order_key(x, SHIFT: tl.constexpr):
    """float32 -> int32 with the floats' order; SHIFT 16 keeps a bf16 value's 16 bits."""
    b = x.to(tl.int32, bitcast=True)
    return tl.where(b < 0, b ^ 0x7FFFFFFF, b) >> SHIFT


@triton.jit
def _as_key(c):
    """An int64 candidate as an int32 key bound: every finite float's key lies
    strictly inside int32, so clamping keeps `key > c` for every key (int32
    compares cost half of int64 ones in the search's inner loop)."""
    return tl.minimum(tl.maximum(c, -2147483648), 2147483647).to(tl.int32)


@triton.jit
def _race_uniform(state, idx):
    """Uniform in (0, 1) from a row's seed state and a token id (race_uniform's mirror)."""
    # int64 products of values < 2**32 and constants < 2**32 stay below 2**64 only
    # after masking, so every step is taken modulo 2**32 (the host mirror's uint32)
    m32 = 0xFFFFFFFF
    x = ((state.to(tl.int64) & m32) * 0x9E3779B1 + (idx.to(tl.int64) * 0x85EBCA77 & m32)) & m32
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & m32
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & m32
    x = x ^ (x >> 16)
    return ((x >> 8).to(tl.float32) + 0.5) * 5.9604644775390625e-08  # 2**-24


@triton.jit
def _row_params(temp_ptr, top_p_ptr, top_k_ptr, r, V):
    """Row r's temperature (greedy rows' 0 read as 1: the caller keeps their
    argmax), top-p, and top-k as a count (0, off, read as the whole vocabulary)."""
    t = tl.load(temp_ptr + r)
    top_k = tl.load(top_k_ptr + r)
    return tl.where(t > 0, t, 1.0), tl.load(top_p_ptr + r), tl.where(top_k > 0, tl.minimum(top_k, V), V)


@triton.jit
def _row_softmax(part_m, part_z, r, S, S_P2: tl.constexpr):
    """The row's max of logits / temperature and its normalizer, from the stats partials."""
    s = tl.arange(0, S_P2)
    ok = s < S
    pm = tl.load(part_m + r * S + s, mask=ok, other=float("-inf"))
    pz = tl.load(part_z + r * S + s, mask=ok, other=0.0)
    m = tl.max(pm, axis=0)
    z = tl.sum(tl.where(ok, pz * tl.exp(pm - m), 0.0), axis=0)
    return m, z


@triton.jit
def _threshold(part_mass, part_cnt, r, rows, S, top_p, top_k, lo, hi, PASSES: tl.constexpr, S_P2: tl.constexpr):
    """Replays the first PASSES search passes from their partials: (lo, hi) with
    F(lo) true and F(hi) false, F(c) = mass above c >= top_p or count above c >= top_k."""
    s = tl.arange(0, S_P2)
    d = tl.arange(0, 16)
    ok = (s < S)[:, None]
    lo = lo.to(tl.int64)
    hi = hi.to(tl.int64)
    for i in tl.static_range(PASSES):
        step = (hi - lo + 15) // 16
        offs = ((i * rows + r) * S + s[:, None]) * 16 + d[None, :]
        mass = tl.sum(tl.load(part_mass + offs, mask=ok, other=0.0), axis=0)
        cnt = tl.sum(tl.load(part_cnt + offs, mask=ok, other=0), axis=0)
        f = (mass >= top_p) | (cnt >= top_k)
        n = tl.sum(f.to(tl.int64), axis=0)
        new_lo = lo + tl.maximum(n - 1, 0) * step
        hi = tl.where(n == 0, lo + 1, tl.minimum(hi, lo + n * step))
        lo = new_lo
    return lo, hi


@triton.jit
def _stats_kernel(x_ptr, temp_ptr, part_m, part_z, V, stride, chunk, S, BLOCK: tl.constexpr):
    r = tl.program_id(0)
    s = tl.program_id(1)
    t = tl.load(temp_ptr + r)
    t = tl.where(t > 0, t, 1.0)
    row = x_ptr + r.to(tl.int64) * stride
    start = s * chunk
    mx = tl.full([BLOCK], float("-inf"), tl.float32)
    for k0 in range(start, start + chunk, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        mx = tl.maximum(mx, tl.load(row + offs, mask=offs < V, other=float("-inf")) / t)
    m = tl.max(mx, axis=0)
    acc = tl.zeros([BLOCK], tl.float32)
    for k0 in range(start, start + chunk, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        x = tl.load(row + offs, mask=offs < V, other=float("-inf")) / t
        acc += tl.where(offs < V, tl.exp(x - m), 0.0)
    tl.store(part_m + r * S + s, m)
    tl.store(part_z + r * S + s, tl.sum(acc, axis=0))


@triton.jit
def _search_kernel(x_ptr, temp_ptr, top_p_ptr, top_k_ptr, part_m, part_z, part_mass, part_cnt, rows, V, stride,
                   chunk, S, LO, HI, PASS: tl.constexpr, SHIFT: tl.constexpr, S_P2: tl.constexpr,
                   SBLOCK: tl.constexpr):
    r = tl.program_id(0)
    s = tl.program_id(1)
    t, top_p, top_k = _row_params(temp_ptr, top_p_ptr, top_k_ptr, r, V)
    m, z = _row_softmax(part_m, part_z, r, S, S_P2)
    inv_z = 1.0 / z
    lo, hi = _threshold(part_mass, part_cnt, r, rows, S, top_p, top_k, LO, HI, PASS, S_P2)
    step = (hi - lo + 15) // 16
    cand = _as_key(lo + tl.arange(0, 16).to(tl.int64) * step)
    row = x_ptr + r.to(tl.int64) * stride
    start = s * chunk
    # per-thread accumulators, reduced across the block once at the end (not per tile)
    mass = tl.zeros([SBLOCK, 16], tl.float32)
    cnt = tl.zeros([SBLOCK, 16], tl.int32)
    for k0 in range(start, start + chunk, SBLOCK):
        offs = k0 + tl.arange(0, SBLOCK)
        ok = offs < V
        x = tl.load(row + offs, mask=ok, other=float("-inf"))
        p = tl.where(ok, tl.exp(x / t - m) * inv_z, 0.0)
        above = (_order_key(x, SHIFT)[:, None] > cand[None, :]) & ok[:, None]
        mass += tl.where(above, p[:, None], 0.0)
        cnt += above.to(tl.int32)
    out = ((PASS * rows + r) * S + s) * 16 + tl.arange(0, 16)
    tl.store(part_mass + out, tl.sum(mass, axis=0))
    tl.store(part_cnt + out, tl.sum(cnt, axis=0))


@triton.jit
def _race_kernel(x_ptr, temp_ptr, top_p_ptr, top_k_ptr, state_ptr, part_mass, part_cnt, part_best, part_idx, rows,
                 V, stride, chunk, S, LO, HI, PASSES: tl.constexpr, SHIFT: tl.constexpr, S_P2: tl.constexpr,
                 BLOCK: tl.constexpr):
    r = tl.program_id(0)
    s = tl.program_id(1)
    t, top_p, top_k = _row_params(temp_ptr, top_p_ptr, top_k_ptr, r, V)
    state = tl.load(state_ptr + r)
    w, _ = _threshold(part_mass, part_cnt, r, rows, S, top_p, top_k, LO, HI, PASSES, S_P2)
    w = _as_key(w)
    row = x_ptr + r.to(tl.int64) * stride
    start = s * chunk
    best = tl.full([], float("-inf"), tl.float32)
    best_i = tl.full([], 0, tl.int64) + start
    for k0 in range(start, start + chunk, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        ok = offs < V
        x = tl.load(row + offs, mask=ok, other=float("-inf"))
        kept = ok & (_order_key(x, SHIFT) > w)
        u = _race_uniform(state, offs)
        score = tl.where(kept, x / t - tl.log(-tl.log(u)), float("-inf"))
        b = tl.max(score, axis=0)
        i = tl.argmax(score, axis=0)  # the first maximum
        take = b > best
        best_i = tl.where(take, k0 + i.to(tl.int64), best_i)
        best = tl.where(take, b, best)
    tl.store(part_best + r * S + s, best)
    tl.store(part_idx + r * S + s, best_i)


@triton.jit
def _finish_kernel(part_best, part_idx, out_ptr, S, S_P2: tl.constexpr):
    r = tl.program_id(0)
    s = tl.arange(0, S_P2)
    b = tl.load(part_best + r * S + s, mask=s < S, other=float("-inf"))
    i = tl.argmax(b, axis=0)  # the first chunk holding the best: its lowest index
    tl.store(out_ptr + r, tl.load(part_idx + r * S + i))


def plan(rows: int, vocab: int) -> tuple[int, int]:
    """(programs per row, chunk): enough programs for the GPU at any batch."""
    s = 1
    while rows * s < TARGET_PROGRAMS and s < 256 and triton.cdiv(vocab, s * 2) >= BLOCK:
        s *= 2
    return s, triton.cdiv(triton.cdiv(vocab, s), BLOCK) * BLOCK


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, top_k: torch.Tensor,
           seed_state: torch.Tensor, key_bits: int = 32, launches: int = 99) -> torch.Tensor:
    """int64 [R] tokens from float32 logits [R, V] (module docstring). Rows with
    temperature 0 are drawn at temperature 1 (the caller keeps their argmax).
    key_bits 16: the logits are bf16 values (the search needs 4 passes, not 8).
    `launches` < 99 stops after that many kernels (bench/sampler_bench.py times each)."""
    rows, v = logits.shape
    out = torch.empty(rows, dtype=torch.int64, device=logits.device)
    if not rows:
        return out
    assert logits.dtype == torch.float32 and logits.stride(1) == 1 and key_bits in (16, 32)
    s, chunk = plan(rows, v)
    passes, shift = (4, 16) if key_bits == 16 else (8, 0)
    lo, hi = (-(1 << 15) - 1, (1 << 15) - 1) if key_bits == 16 else (-(1 << 31) - 1, (1 << 31) - 1)
    dev = logits.device
    part_m = torch.empty((rows, s), dtype=torch.float32, device=dev)
    part_z = torch.empty((rows, s), dtype=torch.float32, device=dev)
    part_mass = torch.empty((passes, rows, s, 16), dtype=torch.float32, device=dev)
    part_cnt = torch.empty((passes, rows, s, 16), dtype=torch.int32, device=dev)
    part_best = torch.empty((rows, s), dtype=torch.float32, device=dev)
    part_idx = torch.empty((rows, s), dtype=torch.int64, device=dev)
    s_p2 = triton.next_power_of_2(s)
    grid = (rows, s)
    _stats_kernel[grid](logits, temperature, part_m, part_z, v, logits.stride(0), chunk, s, BLOCK=BLOCK, num_warps=4)
    for i in range(passes):
        if launches <= 1 + i:
            return out
        _search_kernel[grid](logits, temperature, top_p, top_k, part_m, part_z, part_mass, part_cnt, rows, v,
                             logits.stride(0), chunk, s, lo, hi, PASS=i, SHIFT=shift, S_P2=s_p2, SBLOCK=256,
                             num_warps=4)
    if launches <= 1 + passes:
        return out
    _race_kernel[grid](logits, temperature, top_p, top_k, seed_state, part_mass, part_cnt, part_best, part_idx, rows,
                       v, logits.stride(0), chunk, s, lo, hi, PASSES=passes, SHIFT=shift, S_P2=s_p2, BLOCK=BLOCK,
                       num_warps=4)
    if launches <= 2 + passes:
        return out
    _finish_kernel[(rows,)](part_best, part_idx, out, s, S_P2=s_p2, num_warps=1)
    return out


def race_uniform(state: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Host mirror of the race's noise (tests): float32 in (0, 1)."""
    m = 0xFFFFFFFF
    x = ((np.asarray(state, np.uint64) & m) * _H1 + ((np.asarray(idx, np.uint64) * _H2) & m)) & m
    x = ((x ^ (x >> 16)) * _HMUL) & m
    x = ((x ^ (x >> 16)) * _HMUL) & m
    x = x ^ (x >> 16)
    return (((x >> 8).astype(np.float32) + np.float32(0.5)) * np.float32(2.0**-24)).astype(np.float32)
