"""A decode step's logprob outputs in three launches, without a log_softmax tensor.

Why: the ops path (stages/sampling/sampler.py `pack`) writes log_softmax over the
whole [R, V] logits, then runs torch.topk over it, a gather and a count; at
batch 64 and a 128k vocabulary that took ~295 us on an H200 (log_softmax 55
us, the top-20 143 us), a fifth of a decode step. Only k + 1 logprobs a row
are returned, so:

1. tiles (rows x tiles of TILE tokens): each tile's max and softmax
   normalizer (for the row's logsumexp) and how many of its logits exceed the
   sampled token's (its rank);
2. top (rows x tiles): each tile's candidates for the row's top K, by
   max-and-mask rounds in registers over only its values at or above a bound
   from the tile maxima (a first version ran all K rounds in every tile: 120 us
   at batch 64, latency-bound on the reductions);
3. finish (one program a row): the logsumexp, the rank, and the row's top K
   from the tiles' candidates; writes the step's `ints` and `logprobs` rows.

Logprob = logit - logsumexp of the raw logits, as log_softmax; the rank
counts raw logits above the sampled one (log_softmax's rounding can merge two
close values; this does not). Equal values come out in vocabulary order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

TILE = 2048


@triton.jit
def _tiles_kernel(x_ptr, sampled_ptr, tile_m, tile_z, tile_c, V, stride, T, TILE: tl.constexpr):
    """Per tile: max, softmax normalizer, and logits above the sampled token's."""
    r = tl.program_id(0)
    j = tl.program_id(1)
    row = x_ptr + r.to(tl.int64) * stride
    offs = j * TILE + tl.arange(0, TILE)
    ok = offs < V
    x = tl.load(row + offs, mask=ok, other=float("-inf"))
    xs = tl.load(row + tl.load(sampled_ptr + r))
    mt = tl.max(x, axis=0)
    tl.store(tile_m + r * T + j, mt)
    tl.store(tile_z + r * T + j, tl.sum(tl.where(ok, tl.exp(x - mt), 0.0), axis=0))
    tl.store(tile_c + r * T + j, tl.sum((x > xs).to(tl.int32), axis=0))


@triton.jit
def _top_kernel(x_ptr, tile_m, cand_v, cand_i, V, stride, T, K: tl.constexpr, K_P2: tl.constexpr,
                T_P2: tl.constexpr, TILE: tl.constexpr):
    """A tile's candidates for the row's top K: its largest values, but only those
    at or above L, the K-th largest tile max (the K tiles with the largest maxima
    hold K values >= L, so the row's top K all lie at or above it); most tiles
    hold none, so few max-and-mask rounds run."""
    r = tl.program_id(0)
    j = tl.program_id(1)
    t = tl.arange(0, T_P2)
    tm = tl.load(tile_m + r * T + t, mask=t < T, other=float("-inf"))
    at_least = tl.sum((tm[None, :] >= tm[:, None]).to(tl.int32), axis=1)  # tile maxima >= each one
    bound = tl.max(tl.where(at_least >= K, tm, float("-inf")), axis=0)  # -inf with fewer than K tiles
    row = x_ptr + r.to(tl.int64) * stride
    lane = tl.arange(0, TILE)
    offs = j * TILE + lane
    ok = offs < V
    x = tl.where(ok, tl.load(row + offs, mask=ok, other=float("-inf")), float("-inf"))
    n = tl.minimum(tl.sum((ok & (x >= bound)).to(tl.int32), axis=0), K)
    base = (r * T + j) * K
    kk = tl.arange(0, K_P2)
    tl.store(cand_v + base + kk, float("-inf"), mask=(kk >= n) & (kk < K))  # slots this tile leaves empty
    for i in range(0, n):
        v, at = tl.max(x, axis=0, return_indices=True, return_indices_tie_break_left=True)
        tl.store(cand_v + base + i, v)
        tl.store(cand_i + base + i, j * TILE + at)
        x = tl.where(lane == at, float("-inf"), x)


@triton.jit
def _finish_kernel(x_ptr, sampled_ptr, finish_ptr, tile_m, tile_z, tile_c, cand_v, cand_i, ints_ptr, lp_ptr, stride,
                   T, K: tl.constexpr, T_P2: tl.constexpr, C_P2: tl.constexpr):
    r = tl.program_id(0)
    j = tl.arange(0, T_P2)
    okj = j < T
    mt = tl.load(tile_m + r * T + j, mask=okj, other=float("-inf"))
    zt = tl.load(tile_z + r * T + j, mask=okj, other=0.0)
    big = tl.max(mt, axis=0)
    lse = big + tl.log(tl.sum(tl.where(okj, zt * tl.exp(mt - big), 0.0), axis=0))
    rank = 1 + tl.sum(tl.load(tile_c + r * T + j, mask=okj, other=0), axis=0)
    tok = tl.load(sampled_ptr + r)
    ints = ints_ptr + r * (K + 3)
    lps = lp_ptr + r * (K + 1)
    tl.store(ints, tok)
    tl.store(ints + 1, tl.load(finish_ptr + r))
    tl.store(ints + 2, rank.to(tl.int64))
    tl.store(lps, tl.load(x_ptr + r.to(tl.int64) * stride + tok) - lse)
    c = tl.arange(0, C_P2)
    okc = c < T * K
    v = tl.load(cand_v + r * T * K + c, mask=okc, other=float("-inf"))
    for i in tl.static_range(K):
        best, at = tl.max(v, axis=0, return_indices=True, return_indices_tie_break_left=True)
        tl.store(lps + 1 + i, best - lse)
        tl.store(ints + 3 + i, tl.load(cand_i + r * T * K + at).to(tl.int64))
        v = tl.where(c == at, float("-inf"), v)


def pack(logits: torch.Tensor, sampled: torch.Tensor, finish: torch.Tensor,
         k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ints int64 [R, 3 + k]: sampled, finish, rank, top-k ids; logprobs
    float32 [R, k + 1]: the sampled token's, then the top k's) from float32
    logits [R, V], as the ops path's `Sampler.pack` lays them out."""
    rows, v = logits.shape
    assert logits.dtype == torch.float32 and logits.stride(1) == 1 and 0 < k <= TILE and k <= v
    dev = logits.device
    ints = torch.empty((rows, k + 3), dtype=torch.int64, device=dev)
    lps = torch.empty((rows, k + 1), dtype=torch.float32, device=dev)
    if not rows:
        return ints, lps
    t = triton.cdiv(v, TILE)
    tile_m = torch.empty((rows, t), dtype=torch.float32, device=dev)
    tile_z = torch.empty_like(tile_m)
    tile_c = torch.empty((rows, t), dtype=torch.int32, device=dev)
    cand_v = torch.empty((rows, t, k), dtype=torch.float32, device=dev)
    cand_i = torch.empty((rows, t, k), dtype=torch.int32, device=dev)
    _tiles_kernel[(rows, t)](logits, sampled, tile_m, tile_z, tile_c, v, logits.stride(0), t, TILE=TILE,
                             num_warps=4)
    _top_kernel[(rows, t)](logits, tile_m, cand_v, cand_i, v, logits.stride(0), t, K=k,
                           K_P2=triton.next_power_of_2(k), T_P2=triton.next_power_of_2(t), TILE=TILE, num_warps=4)
    _finish_kernel[(rows,)](logits, sampled, finish, tile_m, tile_z, tile_c, cand_v, cand_i, ints, lps,
                            logits.stride(0), t, K=k, T_P2=triton.next_power_of_2(t),
                            C_P2=triton.next_power_of_2(t * k), num_warps=4)
    return ints, lps
