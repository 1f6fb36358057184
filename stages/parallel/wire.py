"""One step's staged inputs as bytes: rank 0 sends them, every worker stages them alike.

What goes: the used part of each per-step array of the runner's
StagingBuffer, the slot updates (`new_*`, `table_*`) of the step, the counts
the launch reads (with a speculative step's verify columns, `spec_rows`),
and the sampling facts. A message is msgspec's MessagePack: a header of ints and, per array,
its dtype, shape and raw bytes. No pickle; the receiver writes only into the
arrays named here, checked against its own buffer's shapes.
"""

from __future__ import annotations

from typing import Callable

import msgspec
import numpy as np

from ..runner.input_batch import StagedCounts, StagingBuffer

# per-slot updates of the step: the first num_new / num_tables rows are used
NEW_SLOT_ARRAYS = ("new_slots", "new_temperature", "new_top_p", "new_top_k", "new_seed_state", "new_stop_ids",
                   "new_num_eos", "new_max_outputs")
TABLE_ARRAYS = ("table_slots", "table_rows")
_DTYPES = ("int64", "float32", "int32", "bool")


def _step_used(name: str, tokens: int, rows: int) -> int:
    """Entries of the per-step array `name` (input_batch.step_layout) a step uses.
    A name added to the layout must be added here: the KeyError says so."""
    return {"query_start_loc": rows + 1, "start_pos": rows, "seq_lens": rows, "row_slots": rows,
            "sample_mask": rows, "out_index": rows, "draft_ids": rows, "column": rows, "lagged": rows,
            "input_ids": tokens, "prev_rows": tokens}[name]


class WireArray(msgspec.Struct, array_like=True, frozen=True):
    name: str
    dtype: str
    shape: tuple[int, ...]
    data: bytes


class StepMessage(msgspec.Struct, array_like=True, frozen=True):
    step_id: int
    num_tokens: int
    num_rows: int
    num_new: int
    num_tables: int
    any_prev: bool
    any_random: bool
    num_logprobs: int
    arrays: list[WireArray]


def _wire(name: str, a: np.ndarray) -> WireArray:
    a = np.ascontiguousarray(a)
    if a.dtype.name not in _DTYPES:
        raise TypeError(f"{name}: dtype {a.dtype} cannot be sent")
    return WireArray(name, a.dtype.name, tuple(a.shape), a.tobytes())


def _array(w: WireArray) -> np.ndarray:
    if w.dtype not in _DTYPES:
        raise ValueError(f"{w.name}: dtype {w.dtype!r} is not one a step carries")
    return np.frombuffer(w.data, dtype=w.dtype).reshape(w.shape)


def encode_step(buf: StagingBuffer, counts: StagedCounts, step_id: int, any_random: bool, num_logprobs: int,
                layout: list[tuple[str, int, int]]) -> bytes:
    t, r = counts.num_tokens, counts.num_rows
    arrays = [_wire(f"step.{name}", getattr(buf, name)[: _step_used(name, t, r)]) for name, _, _ in layout]
    arrays += [_wire(f"buf.{name}", getattr(buf, name)[: counts.num_new]) for name in NEW_SLOT_ARRAYS]
    arrays += [_wire(f"buf.{name}", getattr(buf, name)[: counts.num_tables]) for name in TABLE_ARRAYS]
    arrays += [_wire("counts.query_lens", counts.query_lens), _wire("counts.seq_lens", counts.seq_lens)]
    if counts.spec_rows is not None:
        arrays.append(_wire("counts.spec_rows", counts.spec_rows))
    msg = StepMessage(step_id, t, r, counts.num_new, counts.num_tables, counts.any_prev, any_random, num_logprobs,
                      arrays)
    return msgspec.msgpack.encode(msg)


def decode_step(data: bytes) -> StepMessage:
    return msgspec.msgpack.decode(data, type=StepMessage)


def stage_into(msg: StepMessage, layout: list[tuple[str, int, int]]) -> Callable[[StagingBuffer], StagedCounts]:
    """A filler for ModelRunner.prepare_staged: writes the message into a pooled buffer."""
    step_names = {name for name, _, _ in layout}
    buf_names = set(NEW_SLOT_ARRAYS) | set(TABLE_ARRAYS)

    def fill(buf: StagingBuffer) -> StagedCounts:
        counts: dict[str, np.ndarray] = {}
        for w in msg.arrays:
            where, _, name = w.name.partition(".")
            a = _array(w)
            if where == "counts" and name in ("query_lens", "seq_lens", "spec_rows"):
                counts[name] = a.copy()
                continue
            if not ((where == "step" and name in step_names) or (where == "buf" and name in buf_names)):
                raise ValueError(f"a step message names an unknown array {w.name!r}")
            dst = getattr(buf, name)
            if a.shape[1:] != dst.shape[1:] or a.shape[0] > dst.shape[0]:
                raise ValueError(f"{w.name}: shape {a.shape} does not fit the buffer's {dst.shape}")
            dst[: a.shape[0]] = a
        return StagedCounts(msg.num_tokens, msg.num_rows, msg.num_new, msg.num_tables, msg.any_prev,
                            counts["query_lens"], counts["seq_lens"], counts.get("spec_rows"))

    return fill
