"""Seeded top-k / top-p / temperature sampling on a GPU without sorting the vocabulary.

Why: the ops path (stages/sampling/sampler.py `_sample`) sorts every row; at batch 64
and a 128k vocabulary that sort alone took 413 us on an H200 (bf16 keys), a
quarter of a decode step. A first sort-free version searched each row's top-p
threshold with 16-way passes (4 for bf16 keys) and took ~330 us, compute-bound
on the comparisons. This one draws by rejection (FlashInfer's idea, simplified):

The kept set K is every token whose key group (ties kept or dropped together)
has mass < top_p and fewer than top_k tokens above it; K is an upper set by
key. Round 1 draws j1 from the whole renormalized distribution by inverse CDF
in vocabulary order (a uniform per row and round, a fixed hash of the row's
seed state). If j1 is in K (one pass: mass and count above j1) it is the
answer: conditioned on landing in K, the draw has K's renormalized
distribution. If not, nothing at or below j1's key is in K, so round 2 draws
from the tokens above j1's key, and so on. Each round accepts with
probability mass(K) / mass(candidates) >= top_p when top-k is off, so three
rounds leave a top-p 0.95 row undecided about once in 8,000; such a row (and
rows with a small top-k on a flat distribution) ends in `_fallback_kernel`:
one program finds the exact threshold with 16-way passes, then draws from K.

Launches (fixed, so a CUDA graph holds them; decided rows return at once):
stats (per chunk: max, softmax normalizer, argmax; per block of BLOCK tokens:
mass), locate 1, then three times check (mass per block and count above the
last draw) + locate (accept it, or draw again: a block by the masses, then a
token inside it), fallback. Partials are read back in a fixed order: no atomics,
so a row's token depends only on its logits, parameters and seed state.

Greedy rows (temperature 0) get the argmax of the raw logits (the first
maximum, as torch.argmax). Differences from the ops path, by design: the
threshold is by value (ties at the boundary kept or dropped together) and the
draw is another one for the same seed: the same distribution, another token.
Graph and eager steps, overlap and sync all run this code, so they agree.
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

BLOCK = 1024
TARGET_PROGRAMS = 1024
ROUNDS = 3  # rejection rounds before the fallback
_H1, _H2 = 0x9E3779B1, 0x85EBCA77  # odd multipliers of the uniform's hash
_HMUL = 0x45D9F3B
GREEDY = -1  # `rounds` marker of an argmax row


@triton.jit
def _order_key(x, SHIFT: tl.constexpr):
    """float32 -> int32 with the floats' order; SHIFT 16 keeps a bf16 value's 16 bits."""
    b = x.to(tl.int32, bitcast=True)
    return tl.where(b < 0, b ^ 0x7FFFFFFF, b) >> SHIFT


@triton.jit
def _as_key(c):
    """An int64 candidate as an int32 key bound: every finite float's key lies
    strictly inside int32, so clamping keeps `key > c` for every key."""
    return tl.minimum(tl.maximum(c, -2147483648), 2147483647).to(tl.int32)


@triton.jit
def _uniform(state, idx):
    """Uniform in (0, 1) from a row's seed state and a round number (`uniform`'s mirror)."""
    m32 = 0xFFFFFFFF  # every step modulo 2**32, as the host mirror's uint32
    x = ((state.to(tl.int64) & m32) * 0x9E3779B1 + ((idx + tl.zeros([], tl.int64)) * 0x85EBCA77 & m32)) & m32
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & m32
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & m32
    x = x ^ (x >> 16)
    return ((x >> 8).to(tl.float32) + 0.5) * 5.9604644775390625e-08  # 2**-24


@triton.jit
def _row_params(temp_ptr, top_p_ptr, top_k_ptr, r, V):
    """Row r's temperature (greedy rows' 0 read as 1), top-p (1 or more: off),
    and top-k as a count (0, off, read as the whole vocabulary)."""
    t = tl.load(temp_ptr + r)
    top_p = tl.load(top_p_ptr + r)
    top_k = tl.load(top_k_ptr + r)
    return (tl.where(t > 0, t, 1.0), tl.where(top_p >= 1.0, 2.0, top_p),
            tl.where(top_k > 0, tl.minimum(top_k, V), V))


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
def _pick(row, start, end, pivot, t, m, inv_z, target, SHIFT: tl.constexpr, BLOCK: tl.constexpr):
    """Inverse CDF over [start, end) of the tokens whose key is above `pivot`:
    the first whose running mass exceeds `target`, else (rounding) the last such token."""
    run = tl.zeros([], tl.float32)
    first = tl.full([], 2147483647, tl.int32)
    last = tl.full([], -1, tl.int32)
    for k0 in range(start, end, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        ok = offs < end
        x = tl.load(row + offs, mask=ok, other=float("-inf"))
        cand = ok & (_order_key(x, SHIFT) > pivot)
        p = tl.where(cand, tl.exp(x / t - m) * inv_z, 0.0)
        hit = cand & (run + tl.cumsum(p, axis=0) > target)
        first = tl.minimum(first, tl.min(tl.where(hit, offs, 2147483647), axis=0))
        last = tl.maximum(last, tl.max(tl.where(cand, offs, -1), axis=0))
        run += tl.sum(p, axis=0)
    return tl.where(first < 2147483647, first, last)


@triton.jit
def _stats_kernel(x_ptr, temp_ptr, part_m, part_z, part_gm, part_gi, part_bm, rounds_ptr, V, stride, chunk, S,
                  BLOCK: tl.constexpr):
    r = tl.program_id(0)
    s = tl.program_id(1)
    if s == 0:
        tl.store(rounds_ptr + r, 0)  # undecided
    t = tl.load(temp_ptr + r)
    t = tl.where(t > 0, t, 1.0)
    row = x_ptr + r.to(tl.int64) * stride
    start = s * chunk
    mx = tl.full([BLOCK], float("-inf"), tl.float32)
    mi = tl.full([BLOCK], 2147483647, tl.int32)
    for k0 in range(start, start + chunk, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        x = tl.load(row + offs, mask=offs < V, other=float("-inf"))
        up = x > mx  # strictly: each lane keeps its first maximum
        mi = tl.where(up, offs, mi)
        mx = tl.where(up, x, mx)
    gm = tl.max(mx, axis=0)
    m = gm / t
    acc = tl.zeros([], tl.float32)
    nb = chunk // BLOCK
    for k0 in range(start, start + chunk, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        x = tl.load(row + offs, mask=offs < V, other=float("-inf")) / t
        bz = tl.sum(tl.where(offs < V, tl.exp(x - m), 0.0), axis=0)
        tl.store(part_bm + r * S * nb + k0 // BLOCK, bz)  # per block, relative to the chunk's max
        acc += bz
    tl.store(part_m + r * S + s, m)
    tl.store(part_z + r * S + s, acc)
    tl.store(part_gm + r * S + s, gm)
    tl.store(part_gi + r * S + s, tl.min(tl.where(mx == gm, mi, 2147483647), axis=0))


@triton.jit
def _check_kernel(x_ptr, temp_ptr, part_m, part_z, part_bm, part_cnt, token_ptr, rounds_ptr, V, stride, chunk,
                  S, SHIFT: tl.constexpr, S_P2: tl.constexpr, BLOCK: tl.constexpr):
    """Mass (per block) and count (per chunk) of the tokens above the row's last draw."""
    r = tl.program_id(0)
    s = tl.program_id(1)
    if tl.load(rounds_ptr + r) == 0:
        t = tl.load(temp_ptr + r)
        t = tl.where(t > 0, t, 1.0)
        m, z = _row_softmax(part_m, part_z, r, S, S_P2)
        inv_z = 1.0 / z
        row = x_ptr + r.to(tl.int64) * stride
        pivot = _order_key(tl.load(row + tl.load(token_ptr + r)), SHIFT)
        start = s * chunk
        nb = chunk // BLOCK
        cnt = tl.zeros([BLOCK], tl.int32)
        for k0 in range(start, start + chunk, BLOCK):
            offs = k0 + tl.arange(0, BLOCK)
            ok = offs < V
            x = tl.load(row + offs, mask=ok, other=float("-inf"))
            above = ok & (_order_key(x, SHIFT) > pivot)
            tl.store(part_bm + r * S * nb + k0 // BLOCK,
                     tl.sum(tl.where(above, tl.exp(x / t - m) * inv_z, 0.0), axis=0))
            cnt += above.to(tl.int32)
        tl.store(part_cnt + r * S + s, tl.sum(cnt, axis=0))


@triton.jit
def _draw(row, state, mass, ok, b, pivot, t, m, z, V, ROUND: tl.constexpr, SHIFT: tl.constexpr,
          NB_P2: tl.constexpr, BLOCK: tl.constexpr):
    """One inverse-CDF draw from the tokens above `pivot`, whose mass per block is `mass`."""
    target = _uniform(state, ROUND) * tl.sum(mass, axis=0)
    # the block where the running mass passes the target (else, rounding, the last with mass)
    c = tl.min(tl.where(ok & (mass > 0) & (tl.cumsum(mass, axis=0) > target), b, NB_P2), axis=0)
    c = tl.where(c < NB_P2, c, tl.max(tl.where(ok & (mass > 0), b, 0), axis=0))
    before = tl.sum(tl.where(b < c, mass, 0.0), axis=0)
    start = c * BLOCK
    return _pick(row, start, tl.minimum(start + BLOCK, V), pivot, t, m, 1.0 / z, target - before, SHIFT, BLOCK)


@triton.jit
def _locate_kernel(x_ptr, temp_ptr, top_p_ptr, top_k_ptr, state_ptr, part_m, part_z, part_gm, part_gi, part_bm,
                   part_cnt, token_ptr, rounds_ptr, V, stride, chunk, S, ROUND: tl.constexpr, DRAW: tl.constexpr,
                   SHIFT: tl.constexpr, S_P2: tl.constexpr, NB_P2: tl.constexpr, BLOCK: tl.constexpr):
    """Round ROUND for one row: accept the last draw if it is kept (ROUND > 1),
    else draw again from the tokens above it (DRAW); round 1 draws from all."""
    r = tl.program_id(0)
    if tl.load(rounds_ptr + r) == 0:
        s = tl.arange(0, S_P2)
        ok = s < S
        nb = chunk // BLOCK
        b = tl.arange(0, NB_P2)
        okb = b < S * nb
        row = x_ptr + r.to(tl.int64) * stride
        state = tl.load(state_ptr + r)
        t, top_p, top_k = _row_params(temp_ptr, top_p_ptr, top_k_ptr, r, V)
        m, z = _row_softmax(part_m, part_z, r, S, S_P2)
        mass = tl.load(part_bm + r * S * nb + b, mask=okb, other=0.0)
        if ROUND == 1:
            if tl.load(temp_ptr + r) <= 0:
                gm = tl.load(part_gm + r * S + s, mask=ok, other=float("-inf"))
                best = tl.argmax(gm, axis=0)  # the first chunk holding the max holds its first index
                tl.store(token_ptr + r, tl.load(part_gi + r * S + best).to(tl.int64))
                tl.store(rounds_ptr + r, -1)  # GREEDY
            else:
                # stats' block sums are relative to their chunk's max
                cm = tl.load(part_m + r * S + b // nb, mask=okb, other=float("-inf"))
                mass = tl.where(okb, mass * tl.exp(cm - m) / z, 0.0)
                # pivot int32's minimum: below every non-NaN float's key, so every token is a candidate
                tok = _draw(row, state, mass, okb, b, -2147483648, t, m, z, V, ROUND, SHIFT, NB_P2, BLOCK)
                tl.store(token_ptr + r, tok.to(tl.int64))
        else:
            cnt = tl.sum(tl.load(part_cnt + r * S + s, mask=ok, other=0), axis=0)
            if (tl.sum(mass, axis=0) < top_p) & (cnt < top_k):
                tl.store(rounds_ptr + r, ROUND - 1)
            else:
                if DRAW:
                    pivot = _order_key(tl.load(row + tl.load(token_ptr + r)), SHIFT)
                    tok = _draw(row, state, mass, okb, b, pivot, t, m, z, V, ROUND, SHIFT, NB_P2, BLOCK)
                    tl.store(token_ptr + r, tok.to(tl.int64))


@triton.jit
def _fallback_row(x_ptr, temp_ptr, top_p_ptr, top_k_ptr, state_ptr, part_m, part_z, token_ptr, rounds_ptr, r, V,
                  stride, S, LO, HI, PASSES: tl.constexpr, ROUND: tl.constexpr, SHIFT: tl.constexpr,
                  S_P2: tl.constexpr, SBLOCK: tl.constexpr, BLOCK: tl.constexpr):
    t, top_p, top_k = _row_params(temp_ptr, top_p_ptr, top_k_ptr, r, V)
    m, z = _row_softmax(part_m, part_z, r, S, S_P2)
    inv_z = 1.0 / z
    row = x_ptr + r.to(tl.int64) * stride
    lo = LO.to(tl.int64)
    hi = HI.to(tl.int64)
    for _ in tl.static_range(PASSES):
        step = (hi - lo + 15) // 16
        cand = _as_key(lo + tl.arange(0, 16).to(tl.int64) * step)
        mass = tl.zeros([SBLOCK, 16], tl.float32)
        cnt = tl.zeros([SBLOCK, 16], tl.int32)
        for k0 in range(0, V, SBLOCK):
            offs = k0 + tl.arange(0, SBLOCK)
            ok = offs < V
            x = tl.load(row + offs, mask=ok, other=float("-inf"))
            p = tl.where(ok, tl.exp(x / t - m) * inv_z, 0.0)
            above = (_order_key(x, SHIFT)[:, None] > cand[None, :]) & ok[:, None]
            mass += tl.where(above, p[:, None], 0.0)
            cnt += above.to(tl.int32)
        f = (tl.sum(mass, axis=0) >= top_p) | (tl.sum(cnt, axis=0) >= top_k)
        n = tl.sum(f.to(tl.int64), axis=0)
        new_lo = lo + tl.maximum(n - 1, 0) * step
        hi = tl.where(n == 0, lo + 1, tl.minimum(hi, lo + n * step))
        lo = new_lo
    w = _as_key(lo)
    kept = tl.zeros([BLOCK], tl.float32)
    for k0 in range(0, V, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        x = tl.load(row + offs, mask=offs < V, other=float("-inf"))
        kept += tl.where((offs < V) & (_order_key(x, SHIFT) > w), tl.exp(x / t - m) * inv_z, 0.0)
    target = _uniform(tl.load(state_ptr + r), ROUND) * tl.sum(kept, axis=0)
    tl.store(token_ptr + r, _pick(row, 0, V, w, t, m, inv_z, target, SHIFT, BLOCK).to(tl.int64))
    tl.store(rounds_ptr + r, ROUND)


@triton.jit
def _fallback_kernel(x_ptr, temp_ptr, top_p_ptr, top_k_ptr, state_ptr, part_m, part_z, token_ptr, rounds_ptr, V,
                     stride, S, LO, HI, PASSES: tl.constexpr, ROUND: tl.constexpr, SHIFT: tl.constexpr,
                     S_P2: tl.constexpr, SBLOCK: tl.constexpr, BLOCK: tl.constexpr):
    """A row still undecided: its exact threshold w (a radix select by value,
    16 candidates a pass: `mass above c >= top_p or count above c >= top_k`
    holds at lo, not at hi), then one draw from the tokens above w."""
    r = tl.program_id(0)
    if tl.load(rounds_ptr + r) == 0:
        _fallback_row(x_ptr, temp_ptr, top_p_ptr, top_k_ptr, state_ptr, part_m, part_z, token_ptr, rounds_ptr, r, V,
                      stride, S, LO, HI, PASSES, ROUND, SHIFT, S_P2, SBLOCK, BLOCK)


def plan(rows: int, vocab: int) -> tuple[int, int]:
    """(programs per row, chunk): enough programs for the GPU at any batch."""
    s = 1
    while rows * s < TARGET_PROGRAMS and s < 256 and triton.cdiv(vocab, s * 2) >= BLOCK:
        s *= 2
    return s, triton.cdiv(triton.cdiv(vocab, s), BLOCK) * BLOCK


LAUNCHES = ["stats", "locate1", *(f"{k}{i}" for i in range(2, ROUNDS + 2) for k in ("check", "locate")),
            "fallback"]


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, top_k: torch.Tensor,
           seed_state: torch.Tensor, key_bits: int = 32, launches: int = 99,
           rounds: torch.Tensor | None = None) -> torch.Tensor:
    """int64 [R] tokens from float32 logits [R, V] (module docstring); greedy
    rows (temperature 0) get their argmax. key_bits 16: the logits are bf16
    values (the fallback's search takes 4 passes, not 8). `rounds` (int32 [R]),
    if given, receives each row's deciding round (GREEDY for argmax rows,
    ROUNDS + 1 for the fallback). `launches` < 99 stops after that many
    kernels (bench/sampler_bench.py times each; LAUNCHES names them)."""
    rows, v = logits.shape
    out = torch.empty(rows, dtype=torch.int64, device=logits.device)
    if not rows:
        return out
    assert logits.dtype == torch.float32 and logits.stride(1) == 1 and key_bits in (16, 32)
    s, chunk = plan(rows, v)
    passes, shift = (4, 16) if key_bits == 16 else (8, 0)
    lo, hi = (-(1 << 15) - 1, (1 << 15) - 1) if key_bits == 16 else (-(1 << 31) - 1, (1 << 31) - 1)
    dev = logits.device
    f32 = torch.float32
    part_m, part_z, part_gm = (torch.empty((rows, s), dtype=f32, device=dev) for _ in range(3))
    part_bm = torch.empty((rows, s * chunk // BLOCK), dtype=f32, device=dev)
    part_gi, part_cnt = (torch.empty((rows, s), dtype=torch.int32, device=dev) for _ in range(2))
    if rounds is None:
        rounds = torch.empty(rows, dtype=torch.int32, device=dev)
    s_p2 = triton.next_power_of_2(s)
    stride = logits.stride(0)
    common = (temperature, top_p, top_k, seed_state, part_m, part_z, part_gm, part_gi, part_bm, part_cnt, out,
              rounds, v, stride, chunk, s)
    nb_p2 = triton.next_power_of_2(s * chunk // BLOCK)
    _stats_kernel[(rows, s)](logits, temperature, part_m, part_z, part_gm, part_gi, part_bm, rounds, v, stride,
                             chunk, s, BLOCK=BLOCK, num_warps=4)
    done = 1
    for rnd in range(1, ROUNDS + 2):
        if rnd > 1:
            if launches <= done:
                return out
            _check_kernel[(rows, s)](logits, temperature, part_m, part_z, part_bm, part_cnt, out, rounds, v,
                                     stride, chunk, s, SHIFT=shift, S_P2=s_p2, BLOCK=BLOCK, num_warps=4)
            done += 1
        if launches <= done:
            return out
        _locate_kernel[(rows,)](logits, *common, ROUND=rnd, DRAW=rnd <= ROUNDS, SHIFT=shift, S_P2=s_p2,
                                NB_P2=nb_p2, BLOCK=BLOCK, num_warps=4)
        done += 1
    if launches <= done:
        return out
    _fallback_kernel[(rows,)](logits, temperature, top_p, top_k, seed_state, part_m, part_z, out, rounds, v, stride,
                              s, lo, hi, PASSES=passes, ROUND=ROUNDS + 1, SHIFT=shift, S_P2=s_p2, SBLOCK=256,
                              BLOCK=BLOCK, num_warps=4)
    return out


def uniform(state: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Host mirror of the rounds' uniforms (tests): float32 in (0, 1)."""
    m = 0xFFFFFFFF
    x = ((np.asarray(state, np.uint64) & m) * _H1 + ((np.asarray(idx, np.uint64) * _H2) & m)) & m
    x = ((x ^ (x >> 16)) * _HMUL) & m
    x = ((x ^ (x >> 16)) * _HMUL) & m
    x = x ^ (x >> 16)
    return (((x >> 8).astype(np.float32) + np.float32(0.5)) * np.float32(2.0**-24)).astype(np.float32)
