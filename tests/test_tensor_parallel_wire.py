"""A step's staged inputs as rank 0 sends them to the workers (stages/parallel/wire.py).

Host side only: a real StepStager stages real scheduler rows into one
StagingBuffer; the bytes must stage the same step into another buffer.
"""

from __future__ import annotations

import numpy as np
import pytest

from overlapd.stages.parallel.wire import (
    NEW_SLOT_ARRAYS, TABLE_ARRAYS, StepMessage, WireArray, decode_step, encode_step, stage_into,
)
from overlapd.stages.runner.input_batch import BatchLimits, StagingBuffer, step_layout
from overlapd.stages.runner.step_stager import StepStager
from overlapd.stages.step_types import SamplingParams, ScheduledRow, SchedulerOutput, TokenStops

LIM = BatchLimits(max_tokens=32, max_rows=4, max_blocks=8, block_size=4, num_blocks=32, max_model_len=32,
                  vocab_size=100, verify_columns=4)


def rows_step1() -> SchedulerOutput:
    stops = TokenStops(ids=(2, 7), num_eos=1, max_outputs=9)
    return SchedulerOutput(1, [
        ScheduledRow(11, [1, 5, 6, 7, 8], 0, False, True, 0, [3, 4], SamplingParams(temperature=0.7, top_p=0.9,
                     top_k=5, seed=3), 3, stops),
        ScheduledRow(12, [1, 9], 0, False, True, 0, [5], SamplingParams(temperature=0.0), 4),
    ])


def rows_step2() -> SchedulerOutput:
    """A decode from the previous step's output and a verify row with two drafts."""
    return SchedulerOutput(2, [
        ScheduledRow(11, [-1], 5, True, True, 1, [3, 4], SamplingParams(temperature=0.7, top_p=0.9, top_k=5,
                     seed=3), 3),
        ScheduledRow(12, [40, 41, 42], 2, False, True, 1, [5, 6], SamplingParams(temperature=0.0), 4,
                     num_drafts=2),
    ])


def garbage_buffer() -> StagingBuffer:
    buf = StagingBuffer(LIM)
    for name, a in vars(buf).items():
        if isinstance(a, np.ndarray) and name != "step":
            a[...] = 77
    buf.step[:] = 77
    return buf


def used(buf: StagingBuffer, t: int, r: int, new: int, tables: int) -> dict[str, np.ndarray]:
    out = {"input_ids": buf.input_ids[:t], "prev_rows": buf.prev_rows[:t],
           "query_start_loc": buf.query_start_loc[: r + 1]}
    for name in ("start_pos", "seq_lens", "row_slots", "sample_mask", "out_index", "draft_ids"):
        out[name] = getattr(buf, name)[:r]
    out.update({name: getattr(buf, name)[:new] for name in NEW_SLOT_ARRAYS})
    out.update({name: getattr(buf, name)[:tables] for name in TABLE_ARRAYS})
    return out


@pytest.mark.parametrize("which", [1, 2])
def test_a_step_sent_as_bytes_stages_the_same_step(which: int) -> None:
    stager, sent = StepStager(LIM), StagingBuffer(LIM)
    so = rows_step1()
    counts = stager.stage(so, sent)
    if which == 2:
        so = rows_step2()
        counts = stager.stage(so, sent)
    assert (counts.spec_rows is not None) == (which == 2)
    layout = step_layout(LIM)
    data = encode_step(sent, counts, so.step_id, True, 3, layout)
    msg = decode_step(data)
    got = garbage_buffer()
    counts2 = stage_into(msg, layout)(got)
    for field in ("num_tokens", "num_rows", "num_new", "num_tables", "any_prev"):
        assert getattr(counts2, field) == getattr(counts, field)
    np.testing.assert_array_equal(counts2.query_lens, counts.query_lens)
    np.testing.assert_array_equal(counts2.seq_lens, counts.seq_lens)
    a = used(sent, counts.num_tokens, counts.num_rows, counts.num_new, counts.num_tables)
    b = used(got, counts.num_tokens, counts.num_rows, counts.num_new, counts.num_tables)
    for name in a:
        assert a[name].dtype == b[name].dtype
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    assert (msg.step_id, msg.any_random, msg.num_logprobs) == (so.step_id, True, 3)
    if which == 2:
        # the verify row runs as three one-token rows on its request's slot, which needs no new parameters
        assert counts.any_prev and counts.num_rows == 4 and counts.num_new == 0
        np.testing.assert_array_equal(counts2.spec_rows, counts.spec_rows)
        np.testing.assert_array_equal(got.draft_ids[:4], np.array([-1, 41, 42, -1]))
        np.testing.assert_array_equal(got.column[:4], np.array([-1, 0, 1, 2]))
        assert len(set(got.row_slots[1:4])) == 1
    else:
        assert counts.num_new == 2 and counts2.spec_rows is None
        np.testing.assert_array_equal(got.new_temperature[:2], np.array([0.7, 0.0], np.float32))


def test_the_codec_knows_every_array_of_a_staging_buffer() -> None:
    """A field added to StagingBuffer must be sent too: this fails until wire.py names it."""
    buf = StagingBuffer(LIM)
    layout = {name for name, _, _ in step_layout(LIM)}
    arrays = {name for name, a in vars(buf).items() if isinstance(a, np.ndarray)}
    assert arrays == {"step"} | layout | set(NEW_SLOT_ARRAYS) | set(TABLE_ARRAYS)


def test_a_message_cannot_write_outside_the_known_arrays() -> None:
    layout = step_layout(LIM)
    counts = [WireArray("counts.query_lens", "int64", (0,), b""), WireArray("counts.seq_lens", "int64", (0,), b"")]

    def message(*arrays: WireArray) -> StepMessage:
        return StepMessage(1, 0, 0, 0, 0, False, False, 0, [*arrays, *counts])

    with pytest.raises(ValueError, match="unknown array"):
        stage_into(message(WireArray("buf.__dict__", "int64", (1,), bytes(8))), layout)(StagingBuffer(LIM))
    with pytest.raises(ValueError, match="does not fit"):
        too_long = np.zeros(LIM.max_tokens + 1, np.int64)
        stage_into(message(WireArray("step.input_ids", "int64", too_long.shape, too_long.tobytes())),
                   layout)(StagingBuffer(LIM))
    with pytest.raises(ValueError, match="not one a step carries"):
        stage_into(message(WireArray("step.input_ids", "object", (1,), bytes(8))), layout)(StagingBuffer(LIM))
