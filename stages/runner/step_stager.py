"""Host side of a step: SchedulerOutput -> a filled staging buffer, no device work.

Keeps the host's view of the persistent batch: which slot each running request
holds, a mirror of every slot's block table (to copy only the rows that
changed), and which output row each request had in the previously staged step
(where a decode's `from_prev_step` input token will be found on the device).
Steps must be launched in the order they are staged; the runner checks that.
"""

from __future__ import annotations

import heapq
import math

import numpy as np

from ..sampling.sampler import seed_state
from ..step_types import MAX_LOGPROBS, ScheduledRow, SchedulerOutput
from .input_batch import BatchLimits, StagedCounts, StagingBuffer
from .stop_flags import NO_LIMIT


class StepStager:
    def __init__(self, lim: BatchLimits) -> None:
        self.lim = lim
        self.slots: dict[int, int] = {}  # req_id -> persistent slot
        self._free = list(range(lim.max_rows))  # a heap: lowest free slot first, deterministic
        self._tables = np.zeros((lim.max_rows, lim.max_blocks), np.int64)  # mirror of the device tables
        # the same tables as lists: comparing a row's block list with its slot's
        # is the per-row, per-step check, and list equality is the cheap one
        self._table_lists: list[list[int]] = [[] for _ in range(lim.max_rows)]
        self._prev_rows: dict[int, int] = {}  # req_id -> its row in the last staged step (rows that sampled)
        self._prev_verify: set[int] = set()  # requests whose row in the last staged step was a verify row
        self._num_new = self._num_tables = 0  # slot updates staged so far in this step

    def stage(self, so: SchedulerOutput, buf: StagingBuffer) -> StagedCounts:
        self._validate(so)
        for req_id in so.freed_req_ids:
            self._release(req_id)
        self._num_new = self._num_tables = 0
        at = token = 0  # the next step row and input token
        any_prev = False
        qlens = np.empty(self.lim.step_rows, np.int64)
        columns = self.lim.verify_columns
        spec_rows = np.full((len(so.rows), columns), -1, np.int64) \
            if any(row.num_drafts for row in so.rows) else None
        prev_rows: dict[int, int] = {}
        verify: set[int] = set()
        for i, row in enumerate(so.rows):
            slot, new = self._slot_for(row.req_id)
            # chained on a verify row in flight: staged as if it kept every draft, moved back on the device
            lagged = int(row.from_prev_step and row.req_id in self._prev_verify)
            if new:
                self._stage_params(buf, slot, row)
            if new or self._table_changed(slot, row.block_ids):
                self._stage_table(buf, slot, row.block_ids)
            if row.num_drafts:
                assert spec_rows is not None
                spec_rows[i, : row.num_tokens] = np.arange(at, at + row.num_tokens)
                qlens[at: at + row.num_tokens] = 1
                any_prev |= row.from_prev_step
                at, token = self._stage_verify_row(buf, row, slot, at, token, lagged)
                prev_rows[row.req_id] = at - 1  # a row chained on it starts from its last column
                verify.add(row.req_id)
                continue
            if spec_rows is not None:
                spec_rows[i, 0] = at
            n = row.num_tokens
            if row.from_prev_step:
                buf.input_ids[token] = 0  # placeholder, replaced on the device
                buf.prev_rows[token] = self._prev_rows[row.req_id]
                any_prev = True
            else:
                buf.input_ids[token: token + n] = row.token_ids
                buf.prev_rows[token: token + n] = -1
            self._stage_row(buf, at, token, row.start_pos, n, slot, row.sample, row.output_index, -1, -1, lagged)
            qlens[at] = n
            if row.sample:
                prev_rows[row.req_id] = at
            at += 1
            token += n
        buf.query_start_loc[at] = token
        self._prev_rows = prev_rows
        self._prev_verify = verify
        return StagedCounts(token, at, self._num_new, self._num_tables, any_prev, qlens[:at],
                            buf.seq_lens[:at].copy(), spec_rows)

    def _stage_row(self, buf: StagingBuffer, at: int, token: int, start: int, n: int, slot: int, sample: bool,
                   output_index: int, draft: int, column: int, lagged: int) -> None:
        buf.query_start_loc[at] = token
        buf.start_pos[at] = start
        buf.seq_lens[at] = start + n
        buf.row_slots[at] = slot
        buf.sample_mask[at] = sample
        buf.out_index[at] = output_index
        buf.draft_ids[at] = draft
        buf.column[at] = column
        buf.lagged[at] = lagged

    def _stage_verify_row(self, buf: StagingBuffer, row: ScheduledRow, slot: int, at: int, token: int,
                          lagged: int) -> tuple[int, int]:
        """A verify row [t, d1..dk] as k + 1 one-token step rows on the request's
        slot: column j holds its token at position start + j, samples output
        output_index + j with the slot's seed state moved j outputs on (the
        device does that: a seeded row draws what it would without speculation),
        and is accepted when it samples d(j+1); after the step the device moves
        the slot's state on by the tokens the row emitted. One-token rows are
        decode rows: a step of them and plain decodes replays a graph."""
        d = row.num_drafts
        for j in range(d + 1):
            if j == 0 and row.from_prev_step:  # chained: the previous row's last column, on the device
                buf.input_ids[token] = 0
                buf.prev_rows[token] = self._prev_rows[row.req_id]
            else:
                buf.input_ids[token] = row.token_ids[j]
                buf.prev_rows[token] = -1
            self._stage_row(buf, at, token, row.start_pos + j, 1, slot, True, row.output_index + j,
                            row.token_ids[j + 1] if j < d else -1, j, lagged)
            at += 1
            token += 1
        return at, token

    def stage_empty(self, so: SchedulerOutput) -> StagedCounts:
        """A step without rows still frees the rows of requests that left."""
        for req_id in so.freed_req_ids:
            self._release(req_id)
        empty = np.zeros(0, np.int64)
        return StagedCounts(0, 0, 0, 0, False, empty, empty)

    # --- slots ----------------------------------------------------------------
    def _slot_for(self, req_id: int) -> tuple[int, bool]:
        slot = self.slots.get(req_id)
        if slot is not None:
            return slot, False
        if not self._free:
            raise RuntimeError(
                f"no free persistent row for request {req_id}: {self.lim.max_rows} requests (max_num_seqs) "
                "hold one; list finished, aborted and preempted requests in freed_req_ids")
        slot = heapq.heappop(self._free)
        self.slots[req_id] = slot
        return slot, True

    def _release(self, req_id: int) -> None:
        slot = self.slots.pop(req_id, None)
        if slot is not None:
            self._table_lists[slot] = []
            heapq.heappush(self._free, slot)

    def _table_changed(self, slot: int, block_ids: list[int]) -> bool:
        return block_ids != self._table_lists[slot]

    def _stage_table(self, buf: StagingBuffer, slot: int, block_ids: list[int]) -> None:
        k = self._num_tables
        self._num_tables += 1
        n = len(block_ids)
        self._tables[slot, :n] = block_ids  # remembered, to stage only changes
        self._tables[slot, n:] = 0  # unused entries point at block 0, never read past seq_len
        self._table_lists[slot] = list(block_ids)
        buf.table_rows[k] = self._tables[slot]
        buf.table_slots[k] = slot

    def _stage_params(self, buf: StagingBuffer, slot: int, row: ScheduledRow) -> None:
        k = self._num_new
        self._num_new += 1
        p = row.params
        buf.new_slots[k] = slot
        buf.new_temperature[k] = p.temperature
        buf.new_top_p[k] = p.top_p
        buf.new_top_k[k] = p.top_k
        # (seed, output_index): a request re-entering after preemption resumes its stream
        buf.new_seed_state[k] = seed_state(row.seed, row.output_index)
        stops = row.stops
        table = stops.table if stops is not None else ()
        buf.new_stop_ids[k, : len(table)] = table
        buf.new_stop_ids[k, len(table):] = -1
        buf.new_num_eos[k] = stops.num_eos if stops is not None else 0
        buf.new_max_outputs[k] = stops.max_outputs if stops is not None else NO_LIMIT

    # --- validation (before any state changes) -----------------------------------
    def _validate(self, so: SchedulerOutput) -> None:
        lim = self.lim
        if len(so.rows) > lim.max_rows:
            raise ValueError(f"SchedulerOutput has {len(so.rows)} rows; max_num_seqs is {lim.max_rows}")
        total = so.num_tokens
        if total > lim.max_tokens:
            raise ValueError(f"SchedulerOutput has {total} tokens; max_num_batched_tokens is {lim.max_tokens}")
        seen: set[int] = set()
        freed = set(so.freed_req_ids)
        for row in so.rows:
            if row.req_id in seen:
                raise ValueError(f"request {row.req_id} appears twice in one step")
            seen.add(row.req_id)
            self._validate_row(row, freed)

    def _validate_row(self, row: ScheduledRow, freed: set[int]) -> None:
        lim, rid, n = self.lim, row.req_id, row.num_tokens
        if n < 1:
            raise ValueError(f"request {rid}: token_ids is empty")
        if row.start_pos < 0:
            raise ValueError(f"request {rid}: start_pos must be >= 0, got {row.start_pos}")
        if row.start_pos + n > lim.max_model_len:
            raise ValueError(f"request {rid}: start_pos {row.start_pos} + {n} tokens exceeds "
                             f"max_model_len {lim.max_model_len}")
        need = -(-(row.start_pos + n) // lim.block_size)
        if len(row.block_ids) < need:
            raise ValueError(f"request {rid}: block_ids has {len(row.block_ids)} blocks, positions up to "
                             f"{row.start_pos + n} need {need}")
        if len(row.block_ids) > lim.max_blocks:
            raise ValueError(f"request {rid}: block_ids has {len(row.block_ids)} blocks; at most "
                             f"{lim.max_blocks} fit max_model_len")
        slot = self.slots.get(rid)
        # A running request's table and parameters were checked when they were
        # staged; a decode row usually brings the same ones again.
        if (slot is None or self._table_changed(slot, row.block_ids)) and row.block_ids \
                and (min(row.block_ids) < 0 or max(row.block_ids) >= lim.num_blocks):
            raise ValueError(f"request {rid}: block_ids must lie in [0, {lim.num_blocks})")
        if row.num_drafts >= lim.verify_columns:
            raise ValueError(f"request {rid}: {row.num_drafts} drafts, but verify rows hold at most "
                             f"{lim.verify_columns - 1}")
        given = row.token_ids
        if row.from_prev_step:
            if n - row.num_drafts != 1:
                raise ValueError(f"request {rid}: from_prev_step rows carry one placeholder token (then drafts), "
                                 f"got {n - row.num_drafts}")
            if rid not in self._prev_rows or rid in freed or rid not in self.slots:
                raise ValueError(f"request {rid}: from_prev_step, but it did not sample in the previous step")
            given = row.token_ids[1:]
        if given and (min(given) < 0 or max(given) >= lim.vocab_size):
            raise ValueError(f"request {rid}: token_ids must lie in [0, {lim.vocab_size})")
        if slot is not None:
            return
        p = row.params
        if not (math.isfinite(p.temperature) and p.temperature >= 0):
            raise ValueError(f"request {rid}: temperature must be a finite number >= 0, got {p.temperature}")
        if not (0.0 < p.top_p <= 1.0):
            raise ValueError(f"request {rid}: top_p must lie in (0, 1], got {p.top_p}")
        if p.top_k < 0:
            raise ValueError(f"request {rid}: top_k must be >= 0 (0 = off), got {p.top_k}")
        if not (0 <= p.logprobs <= MAX_LOGPROBS):
            raise ValueError(f"request {rid}: logprobs must lie in 0..{MAX_LOGPROBS}, got {p.logprobs}")
