"""Drafts made on the device inside the step, before the target's forward (the draft method).

Host side, at prepare time (`stage`): the step's draft rows, from the rows'
`draft_chunk`s (draft_plan.py): verify rows first, those with the most drafts
first, then rows that only catch up; and where each draft goes. A verify row
runs as one-token step rows, one per column (verify.py): draft j is the input
token of column j + 1 and the draft that column j must draw. All of it goes
up in one copy at launch.

Device side, at launch (`Drafter.run`, the execute thread), after the step's
inputs are loaded and before the target forward:
1. one draft forward over every chunk (paged attention over the draft's KV,
   through the target's block tables by persistent row); the argmax at each
   verify row's last chunk position is its d1;
2. for j = 2..(most drafts in a row): a one-token forward for the verify rows
   that want draft j, fed draft j - 1 at position s + j - 1, gives dj. Rows
   are sorted by their draft count, so pass j's rows are a prefix of pass
   j - 1's, and no row writes KV past the slots the host allocated for it;
3. the drafts are scattered into the step's input ids and draft ids, the
   persistent buffers the step's forward (or its graph) reads next.
Nothing is read back on the host: it learns what was accepted from the
verifier's outputs, as with ngram (accepted drafts equal the target's tokens).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from overlapd.stages.model.paged_metadata import build_attention_metadata
from overlapd.stages.runner.input_batch import BatchLimits, DeviceInputs
from overlapd.stages.runtime.ops import INT64, Ops, Tensor
from overlapd.stages.step_types import SchedulerOutput

from .draft_model import DraftModel

# The per-step int64 arrays, in the order they are packed into one upload.
_FIELDS = ("input_ids", "query_start_loc", "start_pos", "seq_lens", "row_slots", "last_index", "last_pos",
           "dst_input", "dst_verify")


@dataclass(slots=True)
class DraftBatch:
    packed: np.ndarray  # int64: the _FIELDS arrays back to back (offsets in `at`)
    at: dict[str, tuple[int, int]]  # field -> (offset, length) in `packed`
    num_tokens: int  # chunk tokens of the first forward
    query_lens: np.ndarray  # int64 [rows]: each draft row's chunk length (host facts for attention)
    seq_lens: np.ndarray  # int64 [rows]: each draft row's positions after its chunk
    num_drafting: int  # verify rows: the first num_drafting draft rows
    passes: list[int]  # rows of the one-token passes j = 2, 3, ...: those with >= j drafts
    last_pos: np.ndarray  # int64 [num_drafting]: each verify row's last known position s


def stage(so: SchedulerOutput, spec_rows: np.ndarray | None, query_start_loc: np.ndarray,
          slots: dict[int, int]) -> DraftBatch | None:
    """The step's draft work; None when no row carries a draft chunk.

    `spec_rows` (StagedCounts) gives each verify row's step row per column and
    `query_start_loc` (the staged step) each step row's input token; `slots`
    is each request's persistent row."""
    drafting: list[int] = []
    catching_up: list[int] = []
    for i, row in enumerate(so.rows):
        if row.num_drafts:
            if row.draft_chunk is None:
                raise ValueError(f"request {row.req_id}: a verify row of the draft method without a draft chunk")
            drafting.append(i)
        elif row.draft_chunk is not None:
            catching_up.append(i)
    if not drafting and not catching_up:
        return None
    drafting.sort(key=lambda i: -so.rows[i].num_drafts)  # stable: ties keep step order
    order = drafting + catching_up
    counts = np.array([len(so.rows[i].draft_chunk[1]) for i in order], np.int64)  # type: ignore[index]
    starts = np.array([so.rows[i].draft_chunk[0] for i in order], np.int64)  # type: ignore[index]
    qsl = np.zeros(len(order) + 1, np.int64)
    np.cumsum(counts, out=qsl[1:])
    ids = np.concatenate([np.asarray(so.rows[i].draft_chunk[1], np.int64) for i in order])  # type: ignore[index]
    seq_lens = starts + counts
    nd = len(drafting)
    dst_input: list[int] = []
    dst_verify: list[int] = []
    num_drafts = [so.rows[i].num_drafts for i in drafting]
    if nd:
        assert spec_rows is not None
        # values come pass by pass: d1 of every verify row, then d2 of those with >= 2, ...
        for j in range(max(num_drafts)):
            for i, d in zip(drafting, num_drafts):
                if d <= j:
                    break
                dst_input.append(int(query_start_loc[spec_rows[i, j + 1]]))
                dst_verify.append(int(spec_rows[i, j]))
    arrays = {
        "input_ids": ids, "query_start_loc": qsl, "start_pos": starts, "seq_lens": seq_lens,
        "row_slots": np.array([slots[so.rows[i].req_id] for i in order], np.int64),
        "last_index": qsl[1: nd + 1] - 1, "last_pos": seq_lens[:nd] - 1,
        "dst_input": np.asarray(dst_input, np.int64), "dst_verify": np.asarray(dst_verify, np.int64),
    }
    at: dict[str, tuple[int, int]] = {}
    offset = 0
    for name in _FIELDS:
        at[name] = (offset, len(arrays[name]))
        offset += len(arrays[name])
    packed = np.concatenate([arrays[name] for name in _FIELDS])
    passes = [sum(d >= j for d in num_drafts) for j in range(2, max(num_drafts, default=0) + 1)]
    return DraftBatch(packed, at, len(ids), counts, seq_lens, nd, passes, arrays["last_pos"])


def buffer_size(lim: BatchLimits, k: int) -> int:
    """int64 entries of the largest step's packed draft arrays."""
    r = lim.max_rows
    return lim.max_tokens + (r + 1) + 3 * r + 2 * r + 2 * r * k


class Drafter:
    """Runs a draft network on the execute thread. Its per-step arrays go up
    into one persistent device buffer sized for the largest step."""

    def __init__(self, ops: Ops, draft: DraftModel, lim: BatchLimits, k: int) -> None:
        self.ops = ops
        self.draft = draft
        self.block_size = lim.block_size
        self.max_tokens = lim.max_tokens
        self._buf = ops.zeros([buffer_size(lim, k)], INT64)
        self._arange = ops.arange(lim.max_rows + 1, INT64)  # the one-token passes' query_start_loc

    def run(self, batch: DraftBatch, inp: DeviceInputs) -> None:
        """Drafts for the step's verify rows, written into `inp.input_ids` (the
        columns' input tokens) and `inp.draft_ids` (what each column must draw)."""
        ops, model, kv = self.ops, self.draft.model, self.draft.kv_caches
        if batch.num_tokens > self.max_tokens:
            raise ValueError(f"draft chunks of {batch.num_tokens} tokens; at most {self.max_tokens} a step")
        ops.copy_from_host_(self._buf, batch.packed)
        v = {name: self._buf[a: a + n] for name, (a, n) in batch.at.items()}
        meta = build_attention_metadata(
            ops, num_tokens=batch.num_tokens, block_size=self.block_size, query_start_loc=v["query_start_loc"],
            start_pos=v["start_pos"], seq_lens=v["seq_lens"], row_slots=v["row_slots"],
            block_tables=inp.block_tables, query_lens_host=batch.query_lens, seq_lens_host=batch.seq_lens)
        hidden = model.forward(v["input_ids"], meta, kv)
        nd = batch.num_drafting
        if nd == 0:
            return
        token = self._argmax(model.compute_logits(hidden, v["last_index"]))
        found = [token]
        base = v["last_pos"]
        for j, rows in enumerate(batch.passes, start=2):  # feed draft j - 1 at position s + j - 1
            meta = build_attention_metadata(
                ops, num_tokens=rows, block_size=self.block_size, query_start_loc=self._arange[: rows + 1],
                start_pos=ops.add(base[:rows], j - 1), seq_lens=ops.add(base[:rows], j),
                row_slots=v["row_slots"][:rows], block_tables=inp.block_tables,
                query_lens_host=np.ones(rows, np.int64), seq_lens_host=batch.last_pos[:rows] + j)
            hidden = model.forward(token[:rows], meta, kv)
            token = self._argmax(model.compute_logits(hidden, self._arange[:rows]))
            found.append(token)
        values = found[0] if len(found) == 1 else ops.concat(found)
        ops.scatter_rows_(inp.input_ids, v["dst_input"], values)
        ops.scatter_rows_(inp.draft_ids, v["dst_verify"], values)

    def _argmax(self, logits: Tensor) -> Tensor:
        return self.ops.cast(self.ops.argmax(logits, axis=-1), INT64)
