"""A decode step's attention metadata in one launch.

Why: stages/model/paged_metadata.py builds positions, step block tables and
KV slots for any mix of prefill and decode rows with ~15 small ops
(searchsorted, index_select, integer arithmetic); in a decode step's CUDA
graph on an H200 they ran as ~15 kernels of 1-2 us, each followed by ~0.4 us
of launch spacing, before the first layer. When every row brings one token
(a decode step, graph or eager) the same values come from one program per
row: position = the row's start position, its persistent row's block table
copied in step order, and slot = block(position) * block_size + offset.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _decode_metadata_kernel(start_pos, row_slots, tables, positions, token_rows, step_tables, slots, max_blocks,
                            block_size, B_P2: tl.constexpr):
    r = tl.program_id(0)
    pos = tl.load(start_pos + r)
    row = tables + tl.load(row_slots + r) * max_blocks
    b = tl.arange(0, B_P2)
    tl.store(step_tables + r * max_blocks + b, tl.load(row + b, mask=b < max_blocks), mask=b < max_blocks)
    tl.store(positions + r, pos)
    tl.store(token_rows + r, r.to(tl.int64))
    tl.store(slots + r, tl.load(row + pos // block_size) * block_size + pos % block_size)


def decode_metadata(start_pos: torch.Tensor, row_slots: torch.Tensor, block_tables: torch.Tensor,
                    block_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(positions, token_rows, step block tables, slot mapping) of R one-token
    rows: int64 [R], [R], [R, max_blocks], [R], as build_attention_metadata gives them."""
    rows, max_blocks = start_pos.shape[0], block_tables.shape[1]
    dev = start_pos.device
    positions = torch.empty(rows, dtype=torch.int64, device=dev)
    token_rows = torch.empty_like(positions)
    slots = torch.empty_like(positions)
    step_tables = torch.empty((rows, max_blocks), dtype=torch.int64, device=dev)
    if rows:
        assert block_tables.is_contiguous() and block_tables.dtype == torch.int64
        _decode_metadata_kernel[(rows,)](start_pos, row_slots, block_tables, positions, token_rows, step_tables,
                                         slots, max_blocks, block_size, B_P2=triton.next_power_of_2(max_blocks),
                                         num_warps=1 if max_blocks <= 256 else 4)
    return positions, token_rows, step_tables, slots
