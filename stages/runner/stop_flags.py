"""Token-level stop conditions checked on the device, so the step's one
device-to-host copy already carries each row's finish code.

Per persistent slot, written when a request enters it (with its sampling
parameters, see input_batch.py): its stop ids (`TokenStops.table`: eos ids
first, padded with -1), how many of them are eos ids, and its output limit.
Per step: each row's `output_index` (staged with the step's other arrays),
so a row's output count is output_index + 1 after this step's token. Nothing
is counted on the device: the verdict depends only on the step's inputs, so a
CUDA graph's warm-up run and its replays, or a request re-entering a slot
after preemption, cannot leave a count behind.

The codes are `token_stop_reason`'s (request.py) in its precedence: EOS, then
STOP, then LENGTH; 0 while the request runs, and for rows that do not sample.
Stop ids beyond the table and stop strings stay with the host.
"""

from __future__ import annotations

from overlapd.kernels import step_kernels

from ..runtime.ops import INT64, Ops, Tensor
from ..step_types import STOP_TABLE_WIDTH, FinishReason

# The output limit of a slot whose row carries no TokenStops: never reached.
NO_LIMIT = 1 << 62


class PersistentStopFlags:
    """The per-slot stop state on the device and the per-step verdict over it."""

    def __init__(self, ops: Ops, max_rows: int, width: int = STOP_TABLE_WIDTH,
                 use_kernels: bool | None = None) -> None:
        self.ops = ops
        self.width = width
        self.stop_ids = ops.full([max_rows, width], -1, INT64)
        self.num_eos = ops.zeros([max_rows], INT64)
        self.max_outputs = ops.full([max_rows], NO_LIMIT, INT64)
        self._cols = ops.reshape(ops.arange(width, INT64), [1, width])
        self.use_kernels = step_kernels.available(ops) if use_kernels is None else use_kernels

    def finish_codes(self, sampled: Tensor, row_slots: Tensor, sample_mask: Tensor, out_index: Tensor) -> Tensor:
        """int64 [R]: each row's FinishReason code after sampling `sampled`."""
        ops, r = self.ops, row_slots.shape[0]
        if self.use_kernels:
            finish = ops.empty([r], INT64)
            if step_kernels.stop_flags(ops, sampled, row_slots, sample_mask, out_index, self.stop_ids,
                                       self.num_eos, self.max_outputs, finish):
                return finish
        table = ops.index_select(self.stop_ids, row_slots)  # [R, W]
        hit = _eq(ops, table, ops.reshape(sampled, [r, 1]))
        eos_col = ops.lt(self._cols, ops.reshape(ops.index_select(self.num_eos, row_slots), [r, 1]))
        eos_hits = ops.sum(ops.logical_and(hit, eos_col), axis=-1, dtype=INT64)
        hits = ops.sum(hit, axis=-1, dtype=INT64)
        at_limit = ops.ge(ops.add(out_index, 1), ops.index_select(self.max_outputs, row_slots))
        code = ops.mul(ops.cast(at_limit, INT64), int(FinishReason.LENGTH))
        code = ops.where(ops.gt(hits, 0), int(FinishReason.STOP), code)
        code = ops.where(ops.gt(eos_hits, 0), int(FinishReason.EOS), code)
        return ops.where(ops.gt(sample_mask, 0), code, 0)


def _eq(ops: Ops, a: Tensor, b: Tensor) -> Tensor:
    return ops.logical_and(ops.ge(a, b), ops.le(a, b))  # the ops layer has no equality


__all__ = ["NO_LIMIT", "PersistentStopFlags"]
