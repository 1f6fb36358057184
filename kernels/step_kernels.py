"""The step's small device kernels (kernels/src/step_kernels.cu), framework-neutral.

Each function launches ONE kernel on the framework's current stream when the
`_cuda` extension was built (OVERLAPD_CUDA=1), a device is visible and the ops
run on the GPU; it returns False otherwise, and the caller runs its ops
fallback in stages/ (what the CPU builds and CI run). Launches never
synchronize, and a launch made while a CUDA graph is being captured is
captured with the rest of the step.

Tensors go in as the framework's own objects; `ops` (stages/runtime/ops.py)
turns them into raw addresses (`data_ptr`) and names the stream
(`current_stream_handle`). They must be contiguous, on the device, and of the
dtypes named below (int64 unless said otherwise): the persistent buffers of
stages/runner/input_batch.py and first-axis slices of them are.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any, Protocol

from .cuda_handoff import native

Tensor = Any  # a framework tensor


class _PtrOps(Protocol):
    device: str

    def data_ptr(self, x: Tensor) -> int: ...
    def current_stream_handle(self) -> int: ...


def _module(ops: _PtrOps) -> ModuleType | None:
    if ops.device != "gpu":
        return None
    mod = native()
    # an extension built before these kernels (and their signatures) existed: the ops paths
    return mod if mod is not None and hasattr(mod, "apply_lag") else None


def available(ops: _PtrOps) -> bool:
    """Whether the functions below launch kernels for tensors of `ops` (else they return False)."""
    return _module(ops) is not None


def build_sampling_params(ops: _PtrOps, temperature: Tensor, top_p: Tensor, top_k: Tensor, seed_state: Tensor,
                          row_slots: Tensor, sample_mask: Tensor, column: Tensor, out_temperature: Tensor,
                          out_top_p: Tensor, out_top_k: Tensor, out_seed_state: Tensor, out_uniform: Tensor, *,
                          advance: bool) -> bool:
    """out_*[r] = the slot row_slots[r]'s parameter; out_seed_state[r] its seed state
    moved column[r] outputs on where column[r] > 0 (a verify row's token column),
    out_uniform[r] that state's uniform; with `advance`, plain rows (column < 0)
    with sample_mask > 0 move their slot's seed state on by one (after the gather).
    temperature, top_p, out_temperature, out_top_p, out_uniform: float32. Row
    count: row_slots' length."""
    mod = _module(ops)
    if mod is None:
        return False
    p = ops.data_ptr
    mod.build_sampling_params(p(temperature), p(top_p), p(top_k), p(seed_state), p(row_slots), p(sample_mask),
                              p(column), p(out_temperature), p(out_top_p), p(out_top_k), p(out_seed_state),
                              p(out_uniform), int(row_slots.shape[0]), bool(advance), ops.current_stream_handle())
    return True


def settle_verified_rows(ops: _PtrOps, seed_state: Tensor, lag: Tensor, row_slots: Tensor, column: Tensor,
                         drew: Tensor, *, advance: bool) -> bool:
    """For each verify row (the step row r with column[r] == 0, its later columns
    r + j with column == j): it emits 1 + the leading later columns whose previous
    column drew its draft (drew == 1); with `advance` seed_state[row_slots[r]]
    moves on by that many outputs; lag[row_slots[r]] = its columns - emitted."""
    mod = _module(ops)
    if mod is None:
        return False
    p = ops.data_ptr
    mod.settle_verified_rows(p(seed_state), p(lag), p(row_slots), p(column), p(drew), int(row_slots.shape[0]),
                             bool(advance), ops.current_stream_handle())
    return True


def apply_lag(ops: _PtrOps, start_pos: Tensor, seq_lens: Tensor, out_index: Tensor, prev_rows: Tensor,
              query_start_loc: Tensor, row_slots: Tensor, lagged: Tensor, lag: Tensor) -> bool:
    """Rows r with lagged[r] != 0 move start_pos, seq_lens, out_index and
    prev_rows[query_start_loc[r]] (where >= 0) back by lag[row_slots[r]]. Row
    count: row_slots' length."""
    mod = _module(ops)
    if mod is None:
        return False
    p = ops.data_ptr
    mod.apply_lag(p(start_pos), p(seq_lens), p(out_index), p(prev_rows), p(query_start_loc), p(row_slots), p(lagged),
                  p(lag), int(row_slots.shape[0]), ops.current_stream_handle())
    return True


def update_input_ids(ops: _PtrOps, input_ids: Tensor, prev_rows: Tensor, prev_sampled: Tensor) -> bool:
    """input_ids[t] = prev_sampled[prev_rows[t]] where prev_rows[t] >= 0, for t < len(prev_rows)."""
    mod = _module(ops)
    if mod is None:
        return False
    p = ops.data_ptr
    mod.update_input_ids(p(input_ids), p(prev_rows), p(prev_sampled), int(prev_rows.shape[0]),
                         ops.current_stream_handle())
    return True


def stop_flags(ops: _PtrOps, sampled: Tensor, row_slots: Tensor, sample_mask: Tensor, out_index: Tensor,
               stop_ids: Tensor, num_eos: Tensor, max_outputs: Tensor, finish: Tensor) -> bool:
    """finish[r] = row r's token-level FinishReason code (0: runs on; 0 for rows with
    sample_mask 0): EOS if sampled[r] is among the first num_eos[slot] entries of
    stop_ids[slot] ([slots, width], padded with -1), STOP if among the others,
    else LENGTH once out_index[r] + 1 >= max_outputs[slot]."""
    mod = _module(ops)
    if mod is None:
        return False
    p = ops.data_ptr
    mod.stop_flags(p(sampled), p(row_slots), p(sample_mask), p(out_index), p(stop_ids), int(stop_ids.shape[1]),
                   p(num_eos), p(max_outputs), p(finish), int(row_slots.shape[0]), ops.current_stream_handle())
    return True


__all__ = ["apply_lag", "available", "build_sampling_params", "settle_verified_rows", "stop_flags",
           "update_input_ids"]
