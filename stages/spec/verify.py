"""Verification of a step's draft tokens in the step's own target forward.

A verify row carries [t, d1..dk] (its last known token, then k drafts). The
target's greedy token after position j is its choice for output j; drafts are
accepted while they equal those choices, and the row emits them plus the
target's token after the last accepted one: accept_num = leading matches + 1.
Greedy rows therefore emit exactly what plain greedy decoding would.

Host side (`stage`, at prepare time, from ScheduledRow facts only): which
hidden states each of the step's rows reads (T per row: a verify row's
1 + d positions, padded with its last; a plain row its last position) and
the drafts they must match (-1 where none, so the last column never matches
and every row accepts at least its target token). Device side
(`Verifier.logits_and_verify`): logits at those positions, argmax, the
matching prefix, one int64 block [R, 1 + T] = accept_num, then T target
tokens, appended to the step's output ints so the step still makes one
device-to-host copy; and each row's last-position logits for the sampler.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from overlapd.stages.runtime.ops import INT64, Ops, Tensor
from overlapd.stages.step_types import SchedulerOutput


@dataclass(slots=True)
class VerifyBatch:
    columns: int  # T = k + 1
    positions: np.ndarray  # int64 [P]: the step's flat token index of every position whose logits are needed
    column_map: np.ndarray  # int64 [R * T]: for each (row, column), its entry in `positions`
    last: np.ndarray  # int64 [R]: each row's last position in `positions` (what plain sampling reads)
    drafts: np.ndarray  # int64 [R, T]: the token each column's target choice must equal, -1 where none


def stage(so: SchedulerOutput, columns: int) -> VerifyBatch | None:
    """The step's verify positions; None when no row carries drafts (a plain step).

    Logits are computed once per needed position (a verify row's 1 + d, a
    plain row's last): plain rows in a speculative step cost no more than in a
    plain step, and the sampler takes its rows' logits from the same block."""
    if not any(row.num_drafts for row in so.rows):
        return None
    r = len(so.rows)
    positions: list[int] = []
    column_map = np.empty((r, columns), np.int64)
    last = np.empty(r, np.int64)
    drafts = np.full((r, columns), -1, np.int64)
    cols = np.arange(columns, dtype=np.int64)
    at = 0
    for i, row in enumerate(so.rows):
        n, d = row.num_tokens, row.num_drafts
        if d >= columns:
            raise ValueError(f"request {row.req_id}: {d} drafts but verify rows hold at most {columns - 1}")
        base = len(positions)
        positions.extend(range(at + n - 1 - d, at + n))  # the last known token, then each draft
        column_map[i] = base + np.minimum(cols, d)
        last[i] = base + d
        if d:
            drafts[i, :d] = row.token_ids[n - d:]
        at += n
    return VerifyBatch(columns, np.asarray(positions, np.int64), column_map.reshape(-1), last, drafts)


class Verifier:
    """Runs on the execute thread. The step's verify arrays go up into
    persistent device buffers with the runtime's per-step upload (no stream
    synchronization on a GPU), sized for the largest step."""

    def __init__(self, ops: Ops, model: object, max_tokens: int, max_rows: int, columns: int) -> None:
        self.ops = ops
        self.model = model
        self._positions = ops.zeros([max_tokens], INT64)
        self._column_map = ops.zeros([max_rows * columns], INT64)
        self._last = ops.zeros([max_rows], INT64)
        self._drafts = ops.zeros([max_rows * columns], INT64)

    def logits_and_verify(self, hidden: Tensor, batch: VerifyBatch,
                          device_drafts: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        """(float32 logits [R, V] at each row's last position, for the sampler;
        int64 [R, 1 + T]: accept_num, then the target's greedy token at each column).
        `device_drafts` (the draft method, drafter.py): (cells of [R * T], ids)
        drafted on the device this step, in place of the host's placeholders."""
        ops, t = self.ops, batch.columns
        r = batch.drafts.shape[0]
        p = len(batch.positions)
        ops.copy_from_host_(self._positions, batch.positions)
        ops.copy_from_host_(self._column_map, batch.column_map)
        ops.copy_from_host_(self._last, batch.last)
        ops.copy_from_host_(self._drafts, batch.drafts.reshape(-1))
        if device_drafts is not None:
            ops.scatter_rows_(self._drafts, *device_drafts)
        logits = self.model.compute_logits(hidden, self._positions[:p])  # type: ignore[attr-defined]
        choice = ops.cast(ops.argmax(logits, axis=-1), INT64)
        target = ops.reshape(ops.index_select(choice, self._column_map[: r * t]), [r, t])
        drafts = ops.reshape(self._drafts[: r * t], [r, t])
        match = ops.logical_and(ops.ge(target, drafts), ops.le(target, drafts))  # the ops layer has no equality
        misses = ops.cumsum(ops.where(match, 0, 1), axis=-1)
        leading = ops.sum(ops.le(misses, 0), axis=-1, keepdim=True, dtype=INT64)
        last_logits = ops.index_select(logits, self._last[:r])
        return last_logits, ops.concat([ops.add(leading, 1), target], axis=1)


def split_outputs(ints: np.ndarray, columns: int) -> tuple[np.ndarray, np.ndarray]:
    """(accept_num i32 [R], target tokens i32 [R, T]) from the last 1 + T columns of a step's ints."""
    tail = ints[:, ints.shape[1] - columns - 1:]
    return tail[:, 0].astype(np.int32), tail[:, 1:].astype(np.int32)
