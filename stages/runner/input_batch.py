"""Persistent step inputs: host staging buffers and address-stable device buffers.

Every buffer here is allocated once at its maximum size (max_num_batched_tokens,
max_num_seqs, max blocks per sequence) and filled in place each step; device
buffers never change address, so a CUDA graph captured over them stays valid.

Requests keep a persistent row ("slot") while they run. Per-slot state lives on
the device and is written only when it changes: the block table row when the
request's block list changes, the sampling parameters, seed state and stop
conditions when the request enters a slot. Everything else is per step and small.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
from overlapd.kernels import step_kernels

from ..runtime.ops import FLOAT32, INT64, Ops, Tensor
from ..sampling.sampler import PersistentSamplingParams, moved_seed_state
from ..step_types import STOP_TABLE_WIDTH
from .stop_flags import PersistentStopFlags


@dataclass(frozen=True, slots=True)
class BatchLimits:
    max_tokens: int  # max_num_batched_tokens
    max_rows: int  # max_num_seqs (also the number of persistent slots)
    max_blocks: int  # blocks one sequence of max_model_len tokens needs
    block_size: int
    num_blocks: int
    max_model_len: int
    vocab_size: int
    # T = k + 1 with speculative decoding, else 1: a verify row runs as up to T
    # one-token step rows (stages/spec/verify.py) on its request's slot
    verify_columns: int = 1

    @property
    def step_rows(self) -> int:
        """Rows a step may have once verify rows are spread out, one per token."""
        return self.max_rows * self.verify_columns

    @property
    def num_slots(self) -> int:
        """Per-slot device state: the requests' slots and the pad slot."""
        return self.max_rows + 1

    @property
    def slot_updates(self) -> int:
        """Slot parameter or table updates one step may stage: one per request."""
        return self.max_rows


def step_layout(lim: BatchLimits) -> list[tuple[str, int, int]]:
    """(name, offset, length) of the per-step int64 arrays packed into one buffer,
    so a step's inputs reach the device in a single copy."""
    t, r = lim.max_tokens, lim.step_rows
    sizes = [("query_start_loc", r + 1), ("start_pos", r), ("seq_lens", r), ("row_slots", r),
             ("sample_mask", r), ("out_index", r), ("draft_ids", r), ("column", r), ("lagged", r),
             ("input_ids", t), ("prev_rows", t)]
    layout, at = [], 0
    for name, n in sizes:
        layout.append((name, at, n))
        at += n
    return layout


HostZeros = Callable[[Sequence[int], str], np.ndarray]  # Ops.host_zeros: (shape, dtype name) -> array


def _np_zeros(shape: Sequence[int], dtype: str) -> np.ndarray:
    return np.zeros(shape, dtype)


class StagingBuffer:
    """Host arrays a step is prepared into; reused through a bounded pool.

    `zeros` allocates them: the runtime's `host_zeros` gives page-locked memory
    where it copies to a device, so a step's inputs go up without being copied
    into a pinned buffer first. That is safe because a buffer returns to the
    pool only after its step's outputs came back: its uploads ran long before."""

    def __init__(self, lim: BatchLimits, zeros: HostZeros = _np_zeros) -> None:
        r, b = lim.slot_updates, lim.max_blocks
        layout = step_layout(lim)
        self.step = zeros([sum(n for _, _, n in layout)], INT64)
        # views into `step`: input_ids, prev_rows (the previous step's output row of a
        # decode's input token, -1: token given here), query_start_loc, start_pos,
        # seq_lens, row_slots, sample_mask (1: the row's last token is sampled),
        # out_index (the output index of the token a row samples), draft_ids (the
        # draft a verify row's token must equal to be accepted, -1: none), column
        # (a verify row's token column j, which samples with its slot's seed state
        # moved j outputs on; -1: a plain row), lagged (1: the row is chained on
        # its request's verify row in flight and moves back by the columns that
        # row did not emit, DeviceInputs.apply_lag)
        for name, at, n in layout:
            setattr(self, name, self.step[at: at + n])
        # slots whose parameters are written this step: requests entering one
        self.new_slots = zeros([r], INT64)
        self.new_temperature = zeros([r], FLOAT32)
        self.new_top_p = zeros([r], FLOAT32)
        self.new_top_p[:] = 1.0
        self.new_top_k = zeros([r], INT64)
        self.new_seed_state = zeros([r], INT64)
        self.new_stop_ids = zeros([r, STOP_TABLE_WIDTH], INT64)  # TokenStops.table, -1 padded
        self.new_stop_ids[:] = -1
        self.new_num_eos = zeros([r], INT64)
        self.new_max_outputs = zeros([r], INT64)
        # block-table rows that changed this step
        self.table_slots = zeros([r], INT64)
        self.table_rows = zeros([r, b], INT64)


class StagingPool:
    """A fixed number of staging buffers: the bound on steps prepared but not collected."""

    def __init__(self, lim: BatchLimits, depth: int, zeros: HostZeros = _np_zeros) -> None:
        if depth < 1:
            raise ValueError(f"staging depth must be >= 1, got {depth}")
        self._free = [StagingBuffer(lim, zeros) for _ in range(depth)]
        self._lock = threading.Lock()  # prepare and collect may run on different threads
        self.depth = depth

    def acquire(self) -> StagingBuffer:
        with self._lock:
            if not self._free:
                raise RuntimeError(
                    f"all {self.depth} staging buffers are in flight: collect a step before preparing "
                    f"another (the pipeline must not have more than {self.depth} steps prepared)")
            return self._free.pop()

    def release(self, buf: StagingBuffer) -> None:
        with self._lock:
            if len(self._free) >= self.depth:
                raise RuntimeError("staging buffer released twice")
            self._free.append(buf)

    @property
    def available(self) -> int:
        with self._lock:
            return len(self._free)


@dataclass(slots=True)
class StagedCounts:
    """How much of a staging buffer one step uses (host facts, no device reads)."""

    num_tokens: int
    num_rows: int
    num_new: int
    num_tables: int
    any_prev: bool  # some input token comes from the previous step's device output
    query_lens: np.ndarray = field(repr=False)  # int64 [num_rows]
    seq_lens: np.ndarray = field(repr=False)  # int64 [num_rows]
    # steps with verify rows: int64 [scheduled rows, T], the step row of each
    # scheduled row's token column (-1: none); num_rows counts step rows
    spec_rows: np.ndarray | None = field(default=None, repr=False)


class DeviceInputs:
    """The persistent device side of the batch.

    `use_kernels` (None: wherever they can run) picks the CUDA step kernels of
    kernels/step_kernels.py over the ops fallbacks; the GPU tests compare both."""

    def __init__(self, ops: Ops, lim: BatchLimits, use_kernels: bool | None = None) -> None:
        r, b, slots, updates = lim.max_rows, lim.max_blocks, lim.num_slots, lim.slot_updates
        self.ops = ops
        self.use_kernels = step_kernels.available(ops) if use_kernels is None else use_kernels
        layout = step_layout(lim)
        self.step = ops.zeros([sum(n for _, _, n in layout)], INT64)
        for name, at, n in layout:  # views into `step` (first-axis slices keep its memory)
            setattr(self, name, self.step[at: at + n])
        # Per-slot state has one slot more than requests get: padding rows of a
        # captured decode step point there (`pad_slot`), never at a request's.
        self.pad_slot = r
        self.block_tables = ops.zeros([slots, b], INT64)  # by slot
        self.sampling = PersistentSamplingParams(ops, slots, self.use_kernels)  # by slot
        self.stops = PersistentStopFlags(ops, slots, STOP_TABLE_WIDTH, self.use_kernels)  # by slot
        self.prev_sampled = ops.zeros([lim.step_rows], INT64)  # the last step's sampled ids, by its row
        # by slot: the columns the request's last verify row did not emit (settle_verified_)
        self.lag = ops.zeros([slots], INT64)
        self._verify_columns = lim.verify_columns
        # landing areas for the per-slot updates, scattered into place from here
        self._new_slots = ops.zeros([updates], INT64)
        self._new_f32 = ops.zeros([updates], FLOAT32)
        self._new_i64 = ops.zeros([updates], INT64)
        self._new_stop_ids = ops.zeros([updates, STOP_TABLE_WIDTH], INT64)
        self._table_slots = ops.zeros([updates], INT64)
        self._table_rows = ops.zeros([updates, b], INT64)

    def persistent_tensors(self) -> dict[str, Tensor]:
        """Every buffer whose address must never change (tests check it)."""
        s, st = self.sampling, self.stops
        return {
            "step": self.step, "input_ids": self.input_ids, "prev_rows": self.prev_rows, "query_start_loc": self.query_start_loc,
            "start_pos": self.start_pos, "seq_lens": self.seq_lens, "row_slots": self.row_slots,
            "sample_mask": self.sample_mask, "out_index": self.out_index, "draft_ids": self.draft_ids,
            "column": self.column, "lagged": self.lagged, "lag": self.lag,
            "block_tables": self.block_tables,
            "temperature": s.temperature, "top_p": s.top_p, "top_k": s.top_k, "seed_state": s.seed_state,
            "stop_ids": st.stop_ids, "num_eos": st.num_eos, "max_outputs": st.max_outputs,
            "prev_sampled": self.prev_sampled,
        }

    def load(self, buf: StagingBuffer, n: StagedCounts) -> None:
        """Copies a staged step in place: per-step arrays, then the changed slots."""
        ops = self.ops
        t = n.num_tokens
        ops.copy_from_host_(self.step, buf.step)  # all per-step arrays in one copy
        if n.num_rows and buf.lagged[: n.num_rows].any():
            self.apply_lag(n.num_rows)
        if n.any_prev:
            self.update_input_ids(t)
        if n.num_tables:
            k = n.num_tables
            ops.copy_from_host_(self._table_slots, buf.table_slots[:k])
            ops.copy_from_host_(self._table_rows, buf.table_rows[:k])
            ops.scatter_rows_(self.block_tables, self._table_slots[:k], self._table_rows[:k])
        if n.num_new:
            self._load_new_slots(buf, n.num_new)

    def update_input_ids(self, t: int) -> None:
        """The first `t` inputs' decode tokens sampled by the previous launch, taken on the device."""
        ops, prev = self.ops, self.prev_rows[:t]
        if self.use_kernels and step_kernels.update_input_ids(ops, self.input_ids, prev, self.prev_sampled):
            return
        taken = ops.index_select(self.prev_sampled, ops.maximum(prev, 0))
        ops.copy_(self.input_ids, ops.where(ops.ge(prev, 0), taken, self.input_ids[:t]))

    def apply_lag(self, r: int) -> None:
        """Rows chained on a verify row were staged as if it emitted every column:
        move their positions, lengths, output indices and input token back by
        the columns it did not emit (the device's `lag`, never the host's)."""
        ops = self.ops
        slots, lagged = self.row_slots[:r], self.lagged[:r]
        if self.use_kernels and step_kernels.apply_lag(ops, self.start_pos, self.seq_lens, self.out_index,
                                                       self.prev_rows, self.query_start_loc, slots, lagged, self.lag):
            return
        back = ops.mul(ops.index_select(self.lag, slots), lagged)
        for x in (self.start_pos, self.seq_lens, self.out_index):
            ops.copy_(x, ops.sub(x[:r], back))
        first = self.query_start_loc[:r]  # each row's first token: a chained row's input from the last step
        prev = ops.index_select(self.prev_rows, first)
        ops.scatter_rows_(self.prev_rows, first, ops.where(ops.ge(prev, 0), ops.sub(prev, back), prev))

    def settle_verified_(self, r: int, drew: Tensor, *, advance: bool) -> None:
        """After a verify step: each verify row's slot keeps its lag (columns it
        did not emit) and, with `advance`, moves its seed state on by the tokens
        it emitted (its leading columns that drew their drafts, + 1). `drew`
        int64 [r]: 1 where a step row sampled its draft."""
        ops, seeds = self.ops, self.sampling.seed_state
        slots, column = self.row_slots[:r], self.column[:r]
        if self.use_kernels and step_kernels.settle_verified_rows(ops, seeds, self.lag, slots, column, drew,
                                                                  advance=advance):
            return
        first = ops.logical_and(ops.ge(column, 0), ops.le(column, 0))  # a verify row's column 0
        later = ops.gt(column, 0)  # its other columns (they follow column 0 in order)
        in_verify = ops.ge(column, 0)
        zero = ops.zeros([1], INT64)
        # emitted[r]: column r's token is emitted (every earlier column of its row drew its draft)
        first_i, in_verify_i = ops.cast(first, INT64), ops.cast(in_verify, INT64)
        emitted = first_i
        for _ in range(self._verify_columns - 1):
            emitted = ops.where(later, ops.concat([zero, ops.mul(drew, emitted)[:-1]]), first_i)
        count, width = self._row_total(emitted, later), self._row_total(in_verify_i, later)
        lag = ops.index_select(self.lag, slots)
        ops.scatter_rows_(self.lag, slots, ops.where(in_verify, ops.sub(width, count), lag))
        if advance:
            state = ops.index_select(seeds, slots)
            ops.scatter_rows_(seeds, slots, ops.where(in_verify, moved_seed_state(ops, state, count), state))

    def _row_total(self, x: Tensor, later: Tensor) -> Tensor:
        """Each verify row's sum of x over its columns, in every column of the row
        (summed backwards into column 0, then copied forward): all of a row's
        columns write their slot alike."""
        ops, zero = self.ops, self.ops.zeros([1], INT64)
        follows = ops.gt(ops.concat([ops.cast(later, INT64)[1:], zero]), 0)
        total = x
        for _ in range(self._verify_columns - 1):
            total = ops.add(x, ops.where(follows, ops.concat([total[1:], zero]), 0))
        for _ in range(self._verify_columns - 1):
            total = ops.where(later, ops.concat([zero, total[:-1]]), total)
        return total

    def _load_new_slots(self, buf: StagingBuffer, k: int) -> None:
        ops, s, st = self.ops, self.sampling, self.stops
        ops.copy_from_host_(self._new_slots, buf.new_slots[:k])
        slots = self._new_slots[:k]
        for dst, src, landing in (
            (s.temperature, buf.new_temperature, self._new_f32),
            (s.top_p, buf.new_top_p, self._new_f32),
            (s.top_k, buf.new_top_k, self._new_i64),
            (s.seed_state, buf.new_seed_state, self._new_i64),
            (st.stop_ids, buf.new_stop_ids, self._new_stop_ids),
            (st.num_eos, buf.new_num_eos, self._new_i64),
            (st.max_outputs, buf.new_max_outputs, self._new_i64),
        ):
            ops.copy_from_host_(landing, src[:k])
            ops.scatter_rows_(dst, slots, landing[:k])
