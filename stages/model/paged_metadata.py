"""Per-token indices of a mixed step, derived on the device from per-row data.

The host stages only per-row facts (where each row's tokens start in the
flattened batch, its first position, its persistent block-table row); token
positions and the KV slot of every token are computed here with tensor ops
from the persistent block tables, as FastDeploy #7431 does, so the host never
builds per-token arrays and a captured graph can recompute them on replay.
"""

from __future__ import annotations

import numpy as np

from ..runtime.ops import INT64, AttentionMetadata, Ops, Tensor


def build_attention_metadata(
    ops: Ops,
    *,
    num_tokens: int,
    block_size: int,
    query_start_loc: Tensor,  # int64 [R + 1]
    start_pos: Tensor,  # int64 [R]: tokens already in the KV cache per row
    seq_lens: Tensor,  # int64 [R]
    row_slots: Tensor,  # int64 [R]: each step row's persistent row
    block_tables: Tensor,  # int64 [max_rows, max_blocks]: by persistent row
    query_lens_host: np.ndarray,
    seq_lens_host: np.ndarray,
) -> AttentionMetadata:
    num_rows = len(query_lens_host)
    max_blocks = block_tables.shape[1]
    fused = getattr(ops, "fused_decode_metadata", None)
    if fused is not None and num_tokens == num_rows:  # one token a row: one kernel (kernels/triton_metadata.py)
        positions, token_rows, step_tables, slot_mapping = fused(start_pos, row_slots, block_tables, block_size)
    else:
        tokens = ops.arange(num_tokens, INT64)
        # token t belongs to the row whose [start, end) holds it: count the row ends <= t
        token_rows = ops.searchsorted(query_start_loc[1:], tokens, right=True)
        offsets = ops.sub(tokens, ops.index_select(query_start_loc, token_rows))
        positions = ops.add(ops.index_select(start_pos, token_rows), offsets)
        step_tables = ops.index_select(block_tables, row_slots)  # [R, max_blocks] in step order
        flat = ops.add(ops.mul(token_rows, max_blocks), ops.floor_divide(positions, block_size))
        blocks = ops.index_select(ops.reshape(step_tables, [num_rows * max_blocks]), flat)
        slot_mapping = ops.add(ops.mul(blocks, block_size), ops.remainder(positions, block_size))
    return AttentionMetadata(
        num_tokens=num_tokens,
        num_rows=num_rows,
        block_size=block_size,
        positions=positions,
        token_rows=token_rows,
        query_start_loc=query_start_loc,
        seq_lens=seq_lens,
        block_tables=step_tables,
        slot_mapping=slot_mapping,
        query_lens_host=query_lens_host,
        seq_lens_host=seq_lens_host,
    )
