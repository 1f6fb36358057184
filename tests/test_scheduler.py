"""The scheduler against a stand-in paged device (tests/scheduler_sim.py)."""

from __future__ import annotations

import random

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from overlapd.stages.engine.config import EngineConfig
from overlapd.stages.request import RequestStatus
from overlapd.stages.scheduling import Scheduler
from overlapd.stages.step_types import FinishReason, SamplingParams, StepOutput
from scheduler_sim import SimDevice, check_blocks, reference_tokens, run_overlap, run_sync

VOCAB = 64
EOS = 7


def make(
    *,
    num_blocks: int = 64,
    block_size: int = 4,
    max_num_seqs: int = 8,
    max_num_batched_tokens: int = 32,
    chunked: bool = True,
    max_model_len: int = 256,
    eos: tuple[int, ...] = (EOS,),
    seed: int = 0,
    prefix_cache: bool = True,
) -> tuple[Scheduler, SimDevice]:
    cfg = EngineConfig(
        prefix_cache=prefix_cache,
        block_size=block_size,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
        enable_chunked_prefill=chunked,
        seed=seed,
    )
    sched = Scheduler(cfg, num_blocks=num_blocks, max_model_len=max_model_len, vocab_size=VOCAB, eos_token_ids=eos)
    return sched, SimDevice(num_blocks, block_size, VOCAB, shared_reads=prefix_cache)


def prompt(n: int, salt: int = 0) -> list[int]:
    rng = random.Random(n * 1000 + salt)
    return [rng.randrange(VOCAB) for _ in range(n)]


def greedy(max_tokens: int = 8, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, **kw)


def assert_matches_reference(sched: Scheduler, log, reqs: dict[int, tuple[list[int], SamplingParams, int]]) -> None:
    for rid, (p, params, seed) in reqs.items():
        want, reason = reference_tokens(p, params, seed, VOCAB, sched.eos_token_ids)
        assert log.tokens[rid] == want, f"request {rid}"
        assert log.finish[rid] == reason


def add_all(sched: Scheduler, specs: list[tuple[int, SamplingParams]]) -> dict:
    reqs = {}
    for i, (n, params) in enumerate(specs):
        p = prompt(n, i)
        req = sched.add_request(i, p, params)
        reqs[i] = (p, params, req.seed)
    return reqs


@pytest.mark.parametrize("runner", [run_sync, run_overlap])
def test_budgets_respected_and_outputs_match_reference(runner) -> None:
    sched, dev = make(max_num_seqs=4, max_num_batched_tokens=16)
    specs = [
        (n, greedy(12) if i % 2 else SamplingParams(max_tokens=12, seed=i))
        for i, n in enumerate([3, 40, 9, 17, 1, 25, 5, 33])
    ]
    reqs = add_all(sched, specs)
    log = runner(sched, dev)  # check_step asserts both budgets on every step
    assert max(s.num_tokens for s in log.steps) == 16
    assert max(len(s.rows) for s in log.steps) == 4
    assert_matches_reference(sched, log, reqs)
    bm = sched.block_manager
    assert bm.num_used_blocks == 0 and bm.num_free_blocks + bm.num_evictable_blocks == bm.num_blocks


def test_chunked_prefill_splits_prompt_over_steps() -> None:
    sched, dev = make(max_num_batched_tokens=32, block_size=4)
    p = prompt(100)
    sched.add_request(1, p, greedy(3))
    chunks = []
    while True:
        so = sched.schedule()
        (row,) = so.rows
        chunks.append((row.start_pos, row.num_tokens, row.sample))
        sched.update(so, dev.run(so))
        if row.sample:
            break
    assert chunks == [(0, 32, False), (32, 32, False), (64, 32, False), (96, 4, True)]
    assert len(row.block_ids) == 25  # exactly the 100 positions, allocated chunk by chunk
    assert row.token_ids == p[96:] and row.output_index == 0


def test_decodes_first_then_prefill_fills_the_budget() -> None:
    sched, dev = make(max_num_batched_tokens=16)
    sched.add_request(1, prompt(5), greedy(20, ignore_eos=True))
    so = sched.schedule()
    sched.update(so, dev.run(so))
    sched.add_request(2, prompt(40), greedy(5))
    so = sched.schedule()
    assert [(r.req_id, r.num_tokens, r.sample) for r in so.rows] == [(1, 1, True), (2, 15, False)]


def test_without_chunking_a_prompt_runs_whole_or_waits() -> None:
    sched, dev = make(max_num_batched_tokens=64, chunked=False, max_model_len=64)
    sched.add_request(1, prompt(40), greedy(4))
    sched.add_request(2, prompt(30), greedy(4))
    so = sched.schedule()
    assert [(r.req_id, r.num_tokens) for r in so.rows] == [(1, 40)]  # 2 does not fit the rest: it waits
    sched.update(so, dev.run(so))
    so = sched.schedule()
    assert [(r.req_id, r.num_tokens) for r in so.rows] == [(1, 1), (2, 30)]


@pytest.mark.parametrize("runner", [run_sync, run_overlap])
def test_preemption_recomputes_to_the_same_outputs(runner) -> None:
    # 12 blocks of 4 = 48 positions for 6 requests that need up to 30 each.
    sched, dev = make(num_blocks=12, block_size=4, max_num_batched_tokens=16, max_num_seqs=6)
    specs = [
        (n, SamplingParams(max_tokens=14, seed=100 + i, ignore_eos=True)) for i, n in enumerate([10, 16, 3, 12, 7, 9])
    ]
    reqs = add_all(sched, specs)
    log = runner(sched, dev)
    assert sched.stats.num_preemptions > 0
    assert_matches_reference(sched, log, reqs)
    assert sched.block_manager.num_used_blocks == 0


def test_preemption_takes_the_latest_arrived() -> None:
    sched, dev = make(num_blocks=4, block_size=4, max_num_batched_tokens=32)
    sched.add_request(1, prompt(4, 1), greedy(4, ignore_eos=True))  # 1 block, grows at position 4
    sched.add_request(2, prompt(6, 2), greedy(3, ignore_eos=True))  # 2 blocks
    sched.add_request(3, prompt(3, 3), greedy(2, ignore_eos=True))  # 1 block
    so = sched.schedule()
    assert [r.req_id for r in so.rows] == [1, 2, 3] and sched.block_manager.num_free_blocks == 0
    sched.update(so, dev.run(so))
    so = sched.schedule()  # 1 needs a block: 3 (latest) goes, 2 keeps its place
    assert sched.get_request(3).status is RequestStatus.PREEMPTED
    assert sched.waiting[0].req_id == 3 and sched.get_request(3).block_ids == []
    assert [r.req_id for r in so.rows] == [1, 2]
    assert so.freed_req_ids == [3]
    sched.update(so, dev.run(so))
    assert sched.stats.num_preemptions == 1


def test_abort_frees_blocks_at_once() -> None:
    sched, dev = make()
    sched.add_request(1, prompt(20), greedy(10))
    sched.add_request(2, prompt(9), greedy(10))
    so = sched.schedule()
    sched.update(so, dev.run(so))
    used = sched.block_manager.num_used_blocks
    assert sched.abort(1)
    assert sched.block_manager.num_used_blocks == used - 5
    check_blocks(sched)
    assert not sched.abort(1) and not sched.abort(99)
    so = sched.schedule()
    assert so.freed_req_ids == [1] and [r.req_id for r in so.rows] == [2]
    sched.add_request(3, prompt(5), greedy(4))
    assert sched.abort(3)  # waiting: it never held a row, so it is not "freed"
    assert sched.abort(2)
    sched.update(so, dev.run(so))  # 2's token from the step in flight is discarded
    assert sched.block_manager.num_used_blocks == 0 and not sched.has_work()


def test_overlap_placeholders_feed_the_next_step() -> None:
    sched, dev = make()
    p = prompt(6)
    sched.add_request(1, p, greedy(5, ignore_eos=True))
    s1 = sched.schedule()
    s2 = sched.schedule()  # before step 1's output is known
    (r1,), (r2,) = s1.rows, s2.rows
    assert (r1.token_ids, r1.start_pos, r1.output_index, r1.from_prev_step) == (p, 0, 0, False)
    assert (r2.token_ids, r2.start_pos, r2.output_index, r2.from_prev_step) == ([-1], 6, 1, True)
    req = sched.get_request(1)
    assert req.num_placeholders == 2 and req.output_token_ids == []
    o1, o2 = dev.run(s1), dev.run(s2)
    sched.update(s1, o1)
    s3 = sched.schedule()
    assert s3.rows[0].from_prev_step and s3.rows[0].output_index == 2
    sched.update(s2, o2)
    assert req.output_token_ids == [int(o1.sampled[0]), int(o2.sampled[0])] and req.num_placeholders == 1
    with pytest.raises(RuntimeError, match="update for step 2 but step 3 is next"):
        sched.update(s2, o2)


def test_output_after_finish_is_discarded() -> None:
    sched, dev = make(eos=())
    sched.add_request(1, prompt(4), greedy(10))
    s1 = sched.schedule()
    o1 = dev.run(s1)
    eos_id = int(o1.sampled[0])  # make the first token an eos
    sched.eos_token_ids = frozenset({eos_id})
    s2 = sched.schedule()
    o2 = dev.run(s2)
    assert [t.finish_reason for t in sched.update(s1, o1)] == [FinishReason.EOS]
    assert sched.block_manager.num_used_blocks == 0  # freed at once, step 2 still in flight
    assert sched.update(s2, o2) == []  # never emitted
    assert sched.get_request(1) is None and not sched.has_work()
    assert sched.schedule().is_empty


@pytest.mark.parametrize("prefix_cache", [False, True])
def test_preempted_with_output_in_flight_keeps_it_fastdeploy_6176(prefix_cache: bool) -> None:
    sched, dev = make(num_blocks=4, block_size=4, max_num_batched_tokens=32, prefix_cache=prefix_cache)
    pa, pb = prompt(4, 1), prompt(11, 2)
    a = sched.add_request(1, pa, SamplingParams(max_tokens=3, seed=5, ignore_eos=True))
    b = sched.add_request(2, pb, SamplingParams(max_tokens=3, seed=6, ignore_eos=True))
    s1 = sched.schedule()  # A: 1 block, B: 3 blocks, both sample
    assert sched.block_manager.num_free_blocks == 0
    o1 = dev.run(s1)
    s2 = sched.schedule()  # A's decode needs a block: B is preempted with its output in flight
    assert b.status is RequestStatus.PREEMPTED and b.num_placeholders == 1
    assert [r.req_id for r in s2.rows] == [1] and s2.freed_req_ids == [2]
    o2 = dev.run(s2)
    sched.update(s1, o1)
    assert b.output_token_ids == [int(o1.sampled[1])]  # saved, not lost
    assert b.num_placeholders == 0 and b.num_computed_tokens == 0
    rest = run_overlap(sched, dev, in_flight=(s2, o2))
    tokens_b = [int(o1.sampled[1])] + rest.tokens.get(2, [])
    want_b, _ = reference_tokens(pb, b.params, b.seed, VOCAB, set())
    assert tokens_b == want_b
    resumed = []  # the recompute: prompt + the saved output, in chunks, from position 0
    for r in (r for s in rest.steps for r in s.rows if r.req_id == 2):
        resumed.append(r)
        if r.sample:
            break
    # with the cache, B's two full prompt blocks outlived its preemption: it resumes after them
    start = 8 if prefix_cache else 0
    assert resumed[0].start_pos == start
    assert sum((r.token_ids for r in resumed), []) == (pb + [int(o1.sampled[1])])[start:]
    want_a, _ = reference_tokens(pa, a.params, a.seed, VOCAB, set())
    assert [int(o1.sampled[0])] + rest.tokens[1] == want_a


@pytest.mark.parametrize("max_tokens", [1, 2, 3])
def test_max_tokens_never_exceeded_with_placeholders(max_tokens: int) -> None:
    sched, dev = make()
    for i in range(4):
        sched.add_request(i, prompt(3 + i, i), greedy(max_tokens, ignore_eos=True))
    log = run_overlap(sched, dev)  # check_step: no row samples at output_index >= max_tokens
    assert all(len(t) == max_tokens for t in log.tokens.values())
    assert all(r == FinishReason.LENGTH for r in log.finish.values())


def test_stop_token_ids_and_ignore_eos() -> None:
    sched, dev = make(eos=())
    p = prompt(5)
    want, _ = reference_tokens(p, greedy(6), 0, VOCAB, set())
    sched.add_request(1, p, greedy(6, stop_token_ids=(want[2],)))
    sched.add_request(2, p, greedy(6, ignore_eos=True))
    sched.eos_token_ids = frozenset({want[1]})
    log = run_sync(sched, dev)
    assert log.tokens[1] == want[:2] and log.finish[1] == FinishReason.EOS
    assert log.tokens[2] == want and log.finish[2] == FinishReason.LENGTH


def test_seeds_assigned_in_admission_order_from_config_seed() -> None:
    seeds = []
    for _ in range(2):
        sched, _ = make(seed=42)
        seeds.append([sched.add_request(i, [1, 2], SamplingParams(seed=None if i != 1 else 9)).seed for i in range(3)])
    assert seeds[0] == seeds[1] and seeds[0][1] == 9 and seeds[0][0] != seeds[0][2]
    other, _ = make(seed=43)
    assert other.add_request(0, [1, 2], SamplingParams()).seed != seeds[0][0]


def test_freed_ids_reach_the_runner_once() -> None:
    sched, dev = make()
    for i in range(3):
        sched.add_request(i, prompt(4, i), greedy(1 + i, ignore_eos=True))
    log = run_sync(sched, dev)
    freed = [rid for s in log.steps for rid in s.freed_req_ids]
    assert sorted(freed) == [0, 1]  # 2 finished in the last step: nothing comes after it
    assert [s.step_id for s in log.steps] == list(range(1, len(log.steps) + 1))


def test_step_output_must_match_the_step() -> None:
    sched, dev = make()
    sched.add_request(1, prompt(4), greedy())
    so = sched.schedule()
    bad = StepOutput(
        step_id=so.step_id,
        req_ids=np.zeros(2, np.uint64),
        sampled=np.zeros(2, np.int32),
        k=0,
        logprobs=None,
        top_ids=None,
        ranks=None,
    )
    with pytest.raises(ValueError):
        sched.update(so, bad)


workload = st.lists(
    st.tuples(
        st.integers(1, 40),  # prompt length
        st.integers(1, 12),  # max_tokens
        st.booleans(),  # greedy
        st.booleans(),  # ignore_eos
        st.integers(0, 6),  # arrives at this loop iteration
    ),
    min_size=1,
    max_size=10,
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    specs=workload,
    block_size=st.sampled_from([1, 2, 4, 16]),
    spare_blocks=st.integers(0, 30),
    max_num_seqs=st.integers(1, 6),
    extra_budget=st.integers(0, 40),
    overlap=st.booleans(),
    aborts=st.lists(st.tuples(st.integers(0, 9), st.integers(0, 30)), max_size=3),
)
def test_random_workloads_keep_exact_accounting(
    specs, block_size, spare_blocks, max_num_seqs, extra_budget, overlap, aborts
) -> None:
    longest = max(n + m - 1 for n, m, *_ in specs)
    num_blocks = -(-longest // block_size) + spare_blocks  # the largest request always fits alone
    sched, dev = make(
        num_blocks=num_blocks,
        block_size=block_size,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_seqs + extra_budget,
    )
    reqs: dict[int, tuple] = {}
    aborted: set[int] = set()

    def between(it: int) -> None:
        for i, (n, m, is_greedy, ignore_eos, at) in enumerate(specs):
            if at == it:
                params = SamplingParams(max_tokens=m, temperature=0.0 if is_greedy else 1.0, ignore_eos=ignore_eos)
                p = prompt(n, i)
                reqs[i] = (p, params, sched.add_request(i, p, params).seed)
        for rid, at in aborts:
            if at == it and sched.abort(rid):
                aborted.add(rid)
                check_blocks(sched)

    log = (run_overlap if overlap else run_sync)(sched, dev, between=between, min_iters=31)
    event(f"preempted: {sched.stats.num_preemptions > 0}, aborted: {bool(aborted)}, overlap: {overlap}")
    assert sched.block_manager.num_used_blocks == 0 and not sched.has_work()
    assert not sched._requests  # no finished request is kept once its outputs landed
    for rid, (p, params, seed) in reqs.items():
        want, reason = reference_tokens(p, params, seed, VOCAB, {EOS})
        got = log.tokens.get(rid, [])
        if rid in aborted:
            assert got == want[: len(got)]
        else:
            assert got == want and log.finish[rid] == reason
        assert len(got) <= params.max_tokens
