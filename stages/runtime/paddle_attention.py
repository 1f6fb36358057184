"""Paged attention for a mixed step on Paddle, with plain tensor ops.

Rows are split into decodes (one query each) and the rest; each group is
padded to its longest query and context and attended with two batched
matmuls over the whole blocks its rows own. Grouped-query heads are folded
into the query axis, so keys and values are never repeated.

The cache is head-major, [kv_heads, num_blocks, block_size, head_dim]: a
gather of a row's blocks along axis 1 then lands directly in the
[kv_heads, rows, keys, head_dim] layout the batched matmul wants. (Paddle's
strided copies are slow: transposing gathered keys into place cost more than
the attention itself; only the small query and output tensors move now.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import paddle
import paddle.nn.functional as F

from .ops import AttentionMetadata, Tensor

# Finite "minus infinity" for masked attention scores: a fully masked padding
# row then gives a harmless uniform softmax instead of NaNs.
_MASKED = -1e30


@dataclass(slots=True)
class _Group:
    """Rows attended together, padded to `qlen` queries and `kvlen` keys each."""

    rows: int
    qlen: int
    kvlen: int
    tok_idx: Tensor | None  # int64 [rows * qlen]: the step token behind each query; None: all, in order
    kv_blocks: Tensor  # int64 [rows * kvlen / block_size]: the cache blocks read, row by row
    bias: Tensor  # float32 [1, rows, 1, kvlen] (qlen 1) or [1, rows, qlen, 1, kvlen]: 0 visible, else masked


@dataclass(slots=True)
class AttentionPlan:
    groups: list[_Group]
    out_index: Tensor | None  # int64 [T] into the concatenated padded outputs; None: identity
    write_index: Tensor  # int64 [Hk * T]: head h, token t -> h * slots_per_head + slot[t]


@dataclass(slots=True)
class PagedKV:
    """One layer's cache. `k`/`v` are [Hk, num_blocks, block_size, D]; the
    `_flat` views of the same memory, [Hk * num_blocks * block_size, D], take writes."""

    k: Tensor
    v: Tensor
    k_flat: Tensor
    v_flat: Tensor

    @classmethod
    def allocate(cls, num_blocks: int, block_size: int, kv_heads: int, head_dim: int, dtype: Any) -> "PagedKV":
        k = paddle.zeros([kv_heads, num_blocks, block_size, head_dim], dtype)
        v = paddle.zeros([kv_heads, num_blocks, block_size, head_dim], dtype)
        flat = [kv_heads * num_blocks * block_size, head_dim]
        return cls(k, v, paddle.reshape(k, flat), paddle.reshape(v, flat))

    def write_(self, k: Tensor, v: Tensor, plan: AttentionPlan) -> None:
        heads, dim = k.shape[1], k.shape[2]
        rows = [heads * k.shape[0], dim]
        k = paddle.reshape(paddle.transpose(k, [1, 0, 2]), rows)  # head-major like the cache
        v = paddle.reshape(paddle.transpose(v, [1, 0, 2]), rows)
        if k.dtype != self.k.dtype:
            k, v = k.astype(self.k.dtype), v.astype(self.v.dtype)
        paddle.scatter_(self.k_flat, plan.write_index, k, overwrite=True)
        paddle.scatter_(self.v_flat, plan.write_index, v, overwrite=True)


def build_plan(meta: AttentionMetadata, kv_heads: int, slots_per_head: int) -> AttentionPlan:
    """Splits the step's rows into decodes (one query) and the rest.

    Each group is padded to its longest query and longest context: decodes
    then batch into one matmul whatever their lengths, and a long prefill
    does not pad every decode row to its length. The host knows every index
    (from the host mirrors), so they go to the device in one upload; masks
    and block lists are derived on the device. One-token rows take their
    query position from the device's seq_lens: a row chained on a verify row
    moves back there (input_batch.py `apply_lag`), and the host's lengths are
    then upper bounds (they still size the key span).
    """
    qlens, seqlens, bs, num_rows = meta.query_lens_host, meta.seq_lens_host, meta.block_size, meta.num_rows
    starts = np.zeros(num_rows, dtype=np.int64)
    np.cumsum(qlens[:-1], out=starts[1:])
    pieces: list[np.ndarray] = []
    specs = []
    out_index = np.empty(meta.num_tokens, dtype=np.int64)
    offset = 0
    for rows in (np.flatnonzero(qlens == 1), np.flatnonzero(qlens > 1)):
        if len(rows) == 0:
            continue
        n, qlen = len(rows), int(qlens[rows].max())
        j = np.arange(qlen, dtype=np.int64)
        valid = j[None, :] < qlens[rows][:, None]
        tok = starts[rows][:, None] + np.where(valid, j[None, :], 0)  # pad with the row's first token
        qpos = (seqlens[rows] - qlens[rows])[:, None] + j[None, :]  # positions; padding sees all keys
        out_index[tok[valid]] = offset + np.flatnonzero(valid.reshape(-1))
        offset += n * qlen
        all_rows = n == num_rows  # rows are sorted, so this means 0..R-1 in order
        all_tokens = all_rows and n * qlen == meta.num_tokens  # no padding: tok is 0..T-1
        specs.append((n, qlen, -(-int(seqlens[rows].max()) // bs), all_rows, all_tokens))
        pieces += [rows.astype(np.int64), tok.reshape(-1), qpos.reshape(-1)]
    packed = paddle.assign(np.concatenate(pieces + [out_index]))  # to_tensor leaks (paddle_ops.from_numpy)
    groups, at = [], 0
    for n, qlen, nblocks, all_rows, all_tokens in specs:
        rows_t = packed[at: at + n]
        tok_t = packed[at + n: at + n + n * qlen]
        qpos_t = packed[at + n + n * qlen: at + n + 2 * n * qlen]
        if qlen == 1:
            seq = meta.seq_lens[:n] if all_rows else paddle.index_select(meta.seq_lens, rows_t)
            qpos_t = seq - 1
        at += n + 2 * n * qlen
        tables = meta.block_tables if all_rows else paddle.index_select(meta.block_tables, rows_t)
        kv_blocks = paddle.reshape(paddle.slice(tables, [1], [0], [nblocks]), [n * nblocks])
        kpos = paddle.reshape(paddle.arange(nblocks * bs, dtype=paddle.int64), [1, 1, nblocks * bs])
        visible = kpos <= paddle.reshape(qpos_t, [n, qlen, 1])
        zeros = paddle.zeros(visible.shape, dtype=paddle.float32)  # tensors, not scalars: where() leaks on scalars
        bias = paddle.where(visible, zeros, paddle.full_like(zeros, _MASKED))
        shape = [1, n, 1, nblocks * bs] if qlen == 1 else [1, n, qlen, 1, nblocks * bs]
        groups.append(_Group(n, qlen, nblocks * bs, None if all_tokens else tok_t, kv_blocks,
                             paddle.reshape(bias, shape)))
    identity = len(specs) == 1 and specs[0][4]
    head_base = paddle.reshape(paddle.arange(kv_heads, dtype=paddle.int64) * slots_per_head, [kv_heads, 1])
    write_index = paddle.reshape(head_base + paddle.reshape(meta.slot_mapping, [1, meta.num_tokens]),
                                 [kv_heads * meta.num_tokens])
    return AttentionPlan(groups, None if identity else packed[at:], write_index)


def paged_attention(q: Tensor, cache: PagedKV, plan: AttentionPlan, scale: float) -> Tensor:
    outs = [_attend_group(q, cache, g, scale) for g in plan.groups]
    out = outs[0] if len(outs) == 1 else paddle.concat(outs, axis=0)
    return out if plan.out_index is None else paddle.index_select(out, plan.out_index)


def _attend_group(q: Tensor, cache: PagedKV, g: _Group, scale: float) -> Tensor:
    heads, dim = q.shape[1], q.shape[2]
    kv_heads = cache.k.shape[0]
    grp = heads // kv_heads
    n, qlen, kvlen = g.rows, g.qlen, g.kvlen
    qg = q if g.tok_idx is None else paddle.index_select(q, g.tok_idx)
    if qg.dtype != paddle.float32:
        qg = qg.astype(paddle.float32)
    # queries of one kv head side by side: [Hk, n, qlen * G, D]
    qg = paddle.transpose(paddle.reshape(qg * scale, [n, qlen, kv_heads, grp, dim]), [2, 0, 1, 3, 4])
    qg = paddle.reshape(qg, [kv_heads, n, qlen * grp, dim])
    k = _gather_blocks(cache.k, g.kv_blocks, n, kvlen)
    v = _gather_blocks(cache.v, g.kv_blocks, n, kvlen)
    scores = paddle.matmul(qg, k, transpose_y=True)  # [Hk, n, qlen * G, kvlen]
    if qlen == 1:
        probs = F.softmax(scores + g.bias, axis=-1)
    else:
        scores = paddle.reshape(scores, [kv_heads, n, qlen, grp, kvlen]) + g.bias
        probs = paddle.reshape(F.softmax(scores, axis=-1), [kv_heads, n, qlen * grp, kvlen])
    out = paddle.reshape(paddle.matmul(probs, v), [kv_heads, n, qlen, grp, dim])
    out = paddle.reshape(paddle.transpose(out, [1, 2, 0, 3, 4]), [n * qlen, heads * dim])
    return out if out.dtype == q.dtype else out.astype(q.dtype)


def _gather_blocks(cache: Tensor, blocks: Tensor, n: int, kvlen: int) -> Tensor:
    """[Hk, n, kvlen, D] float32 keys or values of each row's blocks (no transpose needed)."""
    x = paddle.index_select(cache, blocks, axis=1)  # [Hk, n * nblocks, bs, D]
    x = paddle.reshape(x, [cache.shape[0], n, kvlen, cache.shape[3]])
    return x if x.dtype == paddle.float32 else x.astype(paddle.float32)
