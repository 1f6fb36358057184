"""Paged attention on Torch: the KV cache layout and each step's attention plan.

Decode rows and the rest are grouped, each group padded to its longest query
and context (the same grouping as the Paddle runtime's, paddle_attention.py).
On a GPU the decode group goes to the fused paged decode kernel
(kernels/triton_decode.py), which reads the cache in place; every other group
gathers its keys into a contiguous tensor for torch's SDPA, which keeps the
CPU path (and prefill) plain tensor ops.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .ops import AttentionMetadata, Tensor


@dataclass(slots=True)
class PagedKV:
    k: Tensor  # [num_blocks, block_size, Hk, D]
    v: Tensor
    k_flat: Tensor  # [num_blocks * block_size, Hk, D] views for writes by slot
    v_flat: Tensor


@dataclass(slots=True)
class AttentionGroup:
    rows: int
    qlen: int
    kvlen: int
    tok_idx: Tensor | None
    kv_blocks: Tensor  # [rows * kvlen / block_size]
    bias: Tensor | None  # bool [rows, 1, qlen, 1, kvlen]: True where a query may attend
    tables: Tensor | None = None  # [rows, >= kvlen / block_size], seq_lens [rows]: for the
    seq_lens: Tensor | None = None  # fused decode kernel, which reads the cache in place


@dataclass(slots=True)
class AttentionPlan:
    groups: list[AttentionGroup]
    out_index: Tensor | None
    slot_mapping: Tensor


def build_plan(meta: AttentionMetadata, dev: torch.device, to_dev: Callable[[np.ndarray], Tensor],
                fused_decode: bool = False) -> AttentionPlan:
    """Decode rows and the rest, each padded to its longest query and context
    (the same grouping as the Paddle runtime's; see paddle_attention.py).

    When the decode rows are the step's first rows (the scheduler puts running
    requests first), their query positions and block tables come from the
    device tensors alone: nothing is uploaded, so a decode step can be
    captured in a CUDA graph and replayed with new contents. With
    `fused_decode`, those rows go to the paged decode kernel, which reads
    the cache in place (no gathered keys, no mask)."""
    qlens, seqlens, bs = meta.query_lens_host, meta.seq_lens_host, meta.block_size
    starts = np.concatenate([[0], np.cumsum(qlens)[:-1]]).astype(np.int64)
    out_index = np.empty(meta.num_tokens, dtype=np.int64)
    groups, offset = [], 0
    for rows in (np.flatnonzero(qlens == 1), np.flatnonzero(qlens > 1)):
        if len(rows) == 0:
            continue
        n, qlen = len(rows), int(qlens[rows].max())
        nblocks = -(-int(seqlens[rows].max()) // bs)
        j = np.arange(qlen, dtype=np.int64)
        valid = j[None, :] < qlens[rows][:, None]
        tok = starts[rows][:, None] + np.where(valid, j[None, :], 0)
        out_index[tok[valid]] = offset + np.flatnonzero(valid.reshape(-1))
        offset += n * qlen
        tok_t = None if n * qlen == meta.num_tokens and (tok.reshape(-1) == np.arange(meta.num_tokens)).all() \
            else to_dev(tok.reshape(-1))
        device_rows = qlen == 1 and rows[-1] == n - 1  # decode rows 0..n-1
        if device_rows and fused_decode:
            groups.append(AttentionGroup(n, 1, nblocks * bs, tok_t, meta.block_tables[:n], None,
                                 meta.block_tables[:n], meta.seq_lens[:n]))
            continue
        if device_rows:
            qpos = (meta.seq_lens[:n] - 1).unsqueeze(1)
            tables = meta.block_tables[:n, :nblocks]
        elif qlen == 1:  # one-token rows elsewhere in the step: their positions from the device too
            rows_t = to_dev(rows.astype(np.int64))
            qpos = (meta.seq_lens.index_select(0, rows_t) - 1).unsqueeze(1)
            tables = meta.block_tables.index_select(0, rows_t)[:, :nblocks]
        else:
            qpos = to_dev((seqlens[rows] - qlens[rows])[:, None] + j[None, :])
            tables = meta.block_tables.index_select(0, to_dev(rows.astype(np.int64)))[:, :nblocks]
        kpos = torch.arange(nblocks * bs, device=dev)
        mask = kpos[None, None, :] <= qpos[:, :, None]  # causal over the row's own keys
        groups.append(AttentionGroup(n, qlen, nblocks * bs, tok_t, tables.reshape(-1), mask.view(n, 1, qlen, 1, -1)))
    identity = len(groups) == 1 and groups[0].tok_idx is None
    return AttentionPlan(groups, None if identity else to_dev(out_index), meta.slot_mapping)


def attend_group(q: Tensor, cache: PagedKV, g: AttentionGroup, scale: float) -> Tensor:
    """One fused attention call (torch SDPA) per group. Grouped-query heads fold
    into the query axis ([n, Hk, qlen * grp, D] against [n, Hk, kvlen, D]), so
    the kernel sees plain multi-head attention with a boolean mask and no
    repeated keys."""
    heads, dim = q.shape[1], q.shape[2]
    kv_heads = cache.k.shape[2]
    grp = heads // kv_heads
    n, qlen, kvlen = g.rows, g.qlen, g.kvlen
    qg = (q if g.tok_idx is None else q.index_select(0, g.tok_idx)).to(cache.k.dtype)
    qg = qg.view(n, qlen, kv_heads, grp, dim).permute(0, 2, 1, 3, 4).reshape(n, kv_heads, qlen * grp, dim)
    k = cache.k.index_select(0, g.kv_blocks).view(n, kvlen, kv_heads, dim).transpose(1, 2)
    v = cache.v.index_select(0, g.kv_blocks).view(n, kvlen, kv_heads, dim).transpose(1, 2)
    assert g.bias is not None
    mask = g.bias.expand(n, 1, qlen, grp, kvlen).reshape(n, 1, qlen * grp, kvlen)
    out = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask, scale=scale)
    out = out.view(n, kv_heads, qlen, grp, dim).permute(0, 2, 1, 3, 4)
    return out.reshape(n * qlen, heads * dim).to(q.dtype)
