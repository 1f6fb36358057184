"""ModelRunner mechanics: persistent buffers, staging pool, launch order, input checks."""

from __future__ import annotations

import pytest

from engine_test_support import (
    GREEDY, Driver, Req, get_ops, make_runner, reference_greedy_tokens, tiny_cache, tiny_loaded,  # noqa: F401
)
from overlapd.stages.step_types import SamplingParams, ScheduledRow, SchedulerOutput


def _row(req_id: int, tokens: list[int], start: int, blocks: list[int], **kw) -> ScheduledRow:
    fields = dict(from_prev_step=False, sample=True, output_index=0, params=GREEDY, seed=0)
    fields.update(kw)
    return ScheduledRow(req_id, tokens, start, fields["from_prev_step"], fields["sample"],
                        fields["output_index"], blocks, fields["params"], fields["seed"])


def test_persistent_buffers_keep_their_addresses(tiny_loaded) -> None:
    runner = make_runner(tiny_loaded)
    ops = get_ops()
    before = {name: ops.data_ptr(t) for name, t in runner.persistent_buffers().items()}
    caches = [(ops.data_ptr(c.k), ops.data_ptr(c.v)) for c in runner.kv_caches]
    driver = Driver(runner, token_budget=10)
    for i in range(5):  # new rows, chunked prefill, block-table growth, finished rows freed
        driver.add(Req(i + 1, [0, 5 + i, 9, 17, 33, 2, 8][: 3 + i], SamplingParams(temperature=0.7 * (i % 2),
                                                                                  max_tokens=4 + i)))
    driver.run_overlapped()
    driver.run()
    after = {name: ops.data_ptr(t) for name, t in runner.persistent_buffers().items()}
    assert after == before
    assert [(ops.data_ptr(c.k), ops.data_ptr(c.v)) for c in runner.kv_caches] == caches


def test_only_changed_block_table_rows_are_copied(tiny_loaded) -> None:
    runner = make_runner(tiny_loaded, block_size=4)
    blocks = [5]
    p = runner.prepare(SchedulerOutput(1, [_row(1, [0, 1, 2], 0, blocks)]))
    assert (p.counts.num_new, p.counts.num_tables) == (1, 1)
    runner.collect(runner.launch(p))
    p = runner.prepare(SchedulerOutput(2, [_row(1, [7], 3, blocks, output_index=1)]))
    assert p.counts.num_tables == 0  # position 3 is still in block 5
    runner.collect(runner.launch(p))
    blocks = [5, 9]
    p = runner.prepare(SchedulerOutput(3, [_row(1, [8], 4, blocks, output_index=2)]))
    assert (p.counts.num_new, p.counts.num_tables) == (0, 1)  # crossed into a new block
    runner.collect(runner.launch(p))


def test_staging_pool_bounds_steps_in_flight_and_launch_order_is_enforced(tiny_loaded) -> None:
    runner = make_runner(tiny_loaded)
    so = [SchedulerOutput(i + 1, [_row(i + 1, [0, 3, 4], 0, [i])]) for i in range(4)]
    prepared = [runner.prepare(s) for s in so[:3]]
    assert runner.staging_available == 0
    with pytest.raises(RuntimeError, match="staging buffers are in flight"):
        runner.prepare(so[3])
    with pytest.raises(RuntimeError, match="order they were prepared"):
        runner.launch(prepared[1])
    handles = [runner.launch(p) for p in prepared]
    runner.collect(handles[0])
    assert runner.staging_available == 1
    for h in handles[1:]:
        runner.collect(h)


def test_empty_step_and_freed_rows(tiny_loaded) -> None:
    runner = make_runner(tiny_loaded)
    out = runner.execute(SchedulerOutput(1, [_row(1, [0, 3], 0, [0])]))
    assert runner.slot_of(1) == 0
    empty = runner.execute(SchedulerOutput(2, [], freed_req_ids=[1]))
    assert len(empty.sampled) == 0 and runner.slot_of(1) is None
    out = runner.execute(SchedulerOutput(3, [_row(2, [0, 3], 0, [1])]))
    assert runner.slot_of(2) == 0 and out.sampled.dtype.name == "int32" and out.req_ids.tolist() == [2]


@pytest.mark.parametrize("row, message", [
    (_row(1, [0] * 70, 0, list(range(18))), "max_num_batched_tokens"),
    (_row(1, [0, 1], 255, [0] * 64), "exceeds max_model_len 256"),
    (_row(1, [0, 1, 2, 3, 4], 0, [0]), "need 2"),
    (_row(1, [0, 1], 0, [500]), "block_ids must lie in"),
    (_row(1, [0, 99999], 0, [0]), "token_ids must lie in"),
    (_row(1, [-1], 2, [0], from_prev_step=True), "did not sample in the previous step"),
    (_row(1, [0], 0, [0], params=SamplingParams(top_p=0.0)), "top_p must lie in"),
    (_row(1, [0], 0, [0], params=SamplingParams(temperature=-1.0)), "temperature"),
    (_row(1, [0], 0, [0], params=SamplingParams(logprobs=21)), "logprobs"),
    (_row(1, [], 0, [0]), "token_ids is empty"),
])
def test_bad_scheduler_output_is_rejected_naming_the_field(tiny_loaded, row: ScheduledRow, message: str) -> None:
    runner = make_runner(tiny_loaded)
    with pytest.raises(ValueError, match=message):
        runner.prepare(SchedulerOutput(1, [row]))
    assert runner.staging_available == 3  # the buffer went back to the pool
    assert runner.execute(SchedulerOutput(1, [_row(1, [0, 3], 0, [0])])).sampled.shape == (1,)


def test_duplicate_rows_and_too_many_rows_are_rejected(tiny_loaded) -> None:
    runner = make_runner(tiny_loaded, max_num_seqs=2)
    with pytest.raises(ValueError, match="appears twice"):
        runner.prepare(SchedulerOutput(1, [_row(1, [0], 0, [0]), _row(1, [0], 0, [1])]))
    with pytest.raises(ValueError, match="max_num_seqs"):
        runner.prepare(SchedulerOutput(1, [_row(i, [0], 0, [i]) for i in range(3)]))


def test_rows_that_do_not_sample_leave_the_seed_stream_alone(tiny_loaded) -> None:
    """A prompt split in chunks samples the same tokens as the prompt in one piece."""
    params = SamplingParams(temperature=1.0, max_tokens=8)
    prompt = [0] + list(range(40, 70))
    whole, chunked = Req(1, prompt, params, seed=11), Req(1, prompt, params, seed=11)
    d1 = Driver(make_runner(tiny_loaded))
    d1.add(whole)
    d1.run()
    d2 = Driver(make_runner(tiny_loaded), token_budget=6)
    d2.add(chunked)
    d2.run()
    assert chunked.outputs == whole.outputs


def test_execute_matches_reference_after_many_rows_cycle_through_slots(tiny_loaded) -> None:
    runner = make_runner(tiny_loaded, max_num_seqs=2)
    driver = Driver(runner)
    for wave in range(3):  # slots are freed and reused by later requests
        reqs = [driver.add(Req(10 * wave + i, [0, 3 + wave, 40 + i], SamplingParams(temperature=0.0, max_tokens=3)))
                for i in range(2)]
        driver.run()
        for r in reqs:
            assert r.outputs == reference_greedy_tokens(r.prompt, 3)
        driver.step()  # hands the finished requests' rows back (freed_req_ids)
        assert all(runner.slot_of(r.req_id) is None for r in reqs)


def test_a_failed_launch_returns_its_staging_buffer(tiny_loaded, monkeypatch) -> None:
    runner = make_runner(tiny_loaded)

    def broken(*args, **kwargs):
        raise RuntimeError("device fell over")

    monkeypatch.setattr(runner.model, "forward", broken)
    prepared = runner.prepare(SchedulerOutput(1, [_row(1, [0, 3], 0, [0])]))
    with pytest.raises(RuntimeError, match="device fell over"):
        runner.launch(prepared)
    assert runner.staging_available == 3
