"""Prefix caching in the block manager and the scheduler (the stand-in device of
tests/scheduler_sim.py: every token depends on the whole sequence read back
through the block table, so a block shared wrongly changes the outputs)."""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from overlapd.stages.kv.block_manager import BlockError, BlockManager
from overlapd.stages.kv.prefix_cache import block_key, cache_salt
from overlapd.stages.step_types import SamplingParams
from scheduler_sim import check_blocks, reference_tokens, run_overlap, run_sync
from test_scheduler import EOS, VOCAB, greedy, make

SALT = cache_salt("test-model", "float32")


def tokens(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(VOCAB) for _ in range(n)]


# ---- keys -------------------------------------------------------------------

def test_keys_chain_the_prefix_and_name_the_model() -> None:
    a, b = [1, 2, 3, 4], [5, 6, 7, 8]
    k_a = block_key(SALT, a)
    assert block_key(k_a, b) == block_key(block_key(SALT, a), b)
    assert block_key(k_a, b) != block_key(block_key(SALT, [1, 2, 3, 5]), b)  # same block, other prefix
    assert block_key(SALT, a) != block_key(cache_salt("test-model", "bfloat16"), a)  # other dtype
    assert block_key(SALT, a) != block_key(cache_salt("other-model", "float32"), a)


# ---- block manager ----------------------------------------------------------

def cached_table(bm: BlockManager, n: int, seed: int) -> tuple[list[int], list[bytes]]:
    """A table of n blocks, every one keyed as the chain of a random sequence."""
    table = bm.allocate(n)
    keys: list[bytes] = []
    bm.prefix_cache.extend_keys(keys, tokens(n * bm.block_size, seed), bm.block_size)
    for b, k in zip(table, keys):
        assert bm.cache_block(b, k)
    return table, keys


def test_released_cached_blocks_are_kept_evictable_and_found_again() -> None:
    bm = BlockManager(8, 4, SALT)
    table, keys = cached_table(bm, 3, seed=1)
    bm.free(table)
    assert (bm.num_used_blocks, bm.num_free_blocks, bm.num_evictable_blocks, bm.num_cached_blocks) == (0, 5, 3, 3)
    assert bm.cached_prefix(keys) == table and bm.cached_prefix(keys[:2]) == table[:2]
    assert bm.cached_prefix([block_key(SALT, [9, 9, 9, 9]), *keys[1:]]) == []  # a prefix, not any block
    again = bm.take(bm.cached_prefix(keys[:2]))
    assert again == table[:2] and bm.num_evictable_blocks == 1 and bm.num_used_blocks == 2
    other = bm.take(bm.cached_prefix(keys[:1]))  # a second holder
    assert bm.ref_count(table[0]) == 2
    bm.free(again)
    assert bm.ref_count(table[0]) == 1 and bm.num_evictable_blocks == 2  # table[1] back in the pool
    bm.free(other)
    assert bm.num_used_blocks == 0 and bm.num_free_blocks + bm.num_evictable_blocks == 8
    bm.check()


def test_the_pool_drains_only_when_free_blocks_run_out_oldest_release_first() -> None:
    bm = BlockManager(6, 4, SALT)
    t1, k1 = cached_table(bm, 2, seed=1)
    t2, k2 = cached_table(bm, 2, seed=2)
    bm.free(t1)
    bm.free(t2)  # pool, oldest first: t1's tail, t1's head, t2's tail, t2's head
    assert bm.tokens_that_fit([], 0) == 6 * 4  # evictable blocks count as room
    fresh = bm.allocate(2)
    assert set(fresh).isdisjoint(t1 + t2) and bm.num_evictable_blocks == 4 and bm.num_evictions == 0
    assert bm.allocate(1) == [t1[1]]  # the tail of the least recently released prefix goes first
    assert bm.cached_prefix(k1) == [t1[0]] and bm.cached_prefix(k2) == t2
    bm.allocate(3)
    assert bm.num_evictable_blocks == 0 and bm.num_cached_blocks == 0 and bm.num_evictions == 4
    assert bm.cached_prefix(k1) == [] and bm.cached_prefix(k2) == []
    with pytest.raises(BlockError, match="only 0 are free"):
        bm.allocate(1)
    bm.check()


def test_a_hit_taken_from_the_pool_leaves_less_room() -> None:
    bm = BlockManager(4, 4, SALT)
    table, keys = cached_table(bm, 2, seed=3)
    bm.free(table)
    hits = bm.cached_prefix(keys)
    assert bm.tokens_that_fit_after(hits) == 2 * 4  # 4 available, 2 of them are the hits themselves
    bm.take(hits)
    assert bm.tokens_that_fit(hits, 8) == 2 * 4


def test_a_prefix_computed_twice_is_cached_once_and_the_copy_freed() -> None:
    bm = BlockManager(4, 4, SALT)
    key = block_key(SALT, [1, 2, 3, 4])
    a, b = bm.allocate(2)
    assert bm.cache_block(a, key) and not bm.cache_block(b, key)
    bm.free([a, b])
    assert bm.num_evictable_blocks == 1 and bm.num_free_blocks == 3 and bm.cached_prefix([key]) == [a]


def test_clear_forgets_every_prefix_but_not_the_holders() -> None:
    bm = BlockManager(6, 4, SALT)
    held, hk = cached_table(bm, 2, seed=1)
    parked, pk = cached_table(bm, 2, seed=2)
    bm.free(parked)
    bm.clear_cache()
    assert bm.cached_prefix(hk) == [] and bm.cached_prefix(pk) == []
    assert bm.num_free_blocks == 4 and bm.num_used_blocks == 2
    bm.free(held)
    assert bm.num_free_blocks == 6
    bm.check()


def test_without_a_cache_nothing_is_kept() -> None:
    bm = BlockManager(4, 4)
    with pytest.raises(BlockError):
        bm.cache_block(bm.allocate(1)[0], b"k" * 16)
    assert bm.cached_prefix([b"k" * 16]) == [] and bm.num_evictable_blocks == 0


# ---- scheduler --------------------------------------------------------------

def run_one(sched, dev, rid: int, prompt: list[int], params: SamplingParams) -> list:
    sched.add_request(rid, prompt, params)
    return run_sync(sched, dev).steps


def test_a_shared_prefix_is_computed_once() -> None:
    sched, dev = make(block_size=4)
    system = tokens(18, seed=1)  # four full blocks and two tokens
    first = run_one(sched, dev, 1, system + [1, 2, 3], greedy(3, ignore_eos=True))
    assert first[0].rows[0].start_pos == 0
    second = run_one(sched, dev, 2, system + [4, 5], greedy(3, ignore_eos=True))
    (row,) = second[0].rows
    assert row.start_pos == 16 and row.token_ids == system[16:] + [4, 5]  # the partial block is recomputed
    s = sched.stats
    assert (s.prefix_queried_tokens, s.prefix_hit_tokens) == (21 + 20, 16)
    assert s.prompt_tokens_computed == 21 + 4
    assert row.block_ids[:4] == first[0].rows[0].block_ids[:4]  # the very same blocks


def test_a_prompt_found_whole_still_computes_its_last_token() -> None:
    sched, dev = make(block_size=4)
    p = tokens(16, seed=2)  # exactly four blocks
    want, _ = reference_tokens(p, greedy(4, ignore_eos=True), 0, VOCAB, {EOS})
    run_one(sched, dev, 1, p, greedy(4, ignore_eos=True))
    steps = run_one(sched, dev, 2, p, greedy(4, ignore_eos=True))
    (row,) = steps[0].rows
    # three blocks found, the fourth recomputed into a private block: never write a shared one
    assert row.start_pos == 12 and row.token_ids == p[12:] and row.sample
    assert row.block_ids[3] not in steps[0].rows[0].block_ids[:3]
    sched.add_request(3, p, greedy(4, ignore_eos=True))
    log = run_sync(sched, dev)
    assert log.tokens[3] == want  # and what it samples from the shared blocks is right


def test_partial_blocks_are_never_shared() -> None:
    sched, dev = make(block_size=4)
    p = tokens(7, seed=3)  # one full block, three tokens in a partial one
    run_one(sched, dev, 1, p, greedy(1, ignore_eos=True))  # one output: 7 positions computed, the 8th never
    assert sched.block_manager.num_cached_blocks == 1
    steps = run_one(sched, dev, 2, p + [0], greedy(1, ignore_eos=True))
    assert steps[0].rows[0].start_pos == 4  # the partial block was not kept, let alone shared


def test_generated_blocks_are_cached_for_the_next_turn() -> None:
    sched, dev = make(block_size=4)
    p = tokens(6, seed=4)
    params = greedy(10, ignore_eos=True)
    sched.add_request(1, p, params)
    log = run_overlap(sched, dev)
    turn2 = p + log.tokens[1] + [3, 3, 3]
    steps = run_one(sched, dev, 2, turn2, greedy(2, ignore_eos=True))
    # 15 of 16 computed positions known at the end (the last output's KV is never computed): 3 full blocks
    assert steps[0].rows[0].start_pos == 12


@pytest.mark.parametrize("runner", [run_sync, run_overlap])
def test_the_cache_drains_before_anyone_is_preempted(runner) -> None:
    sched, dev = make(num_blocks=12, block_size=4, max_num_batched_tokens=64)
    for i in range(3):  # leaves 3 x 2 cached blocks behind
        sched.add_request(i, tokens(8, seed=10 + i) + [1], greedy(1, ignore_eos=True))
    runner(sched, dev)
    bm = sched.block_manager
    assert bm.num_evictable_blocks == 6 and bm.num_used_blocks == 0
    sched.add_request(10, tokens(40, seed=20), greedy(4, ignore_eos=True))  # needs 11 blocks
    runner(sched, dev)
    assert sched.stats.num_preemptions == 0 and bm.num_evictions >= 5


@pytest.mark.parametrize("runner", [run_sync, run_overlap])
def test_preemption_with_shared_blocks_recomputes_to_the_same_outputs(runner) -> None:
    sched, dev = make(num_blocks=14, block_size=4, max_num_batched_tokens=16, max_num_seqs=6)
    system = tokens(12, seed=5)
    reqs = {}
    for i in range(6):
        p = system + tokens(1 + i, seed=100 + i)
        params = SamplingParams(max_tokens=10, seed=200 + i, ignore_eos=True) if i % 2 else greedy(10, ignore_eos=True)
        reqs[i] = (p, params, sched.add_request(i, p, params).seed)
    log = runner(sched, dev)
    assert sched.stats.num_preemptions > 0 and sched.stats.prefix_hit_tokens > 0
    for rid, (p, params, seed) in reqs.items():
        assert log.tokens[rid] == reference_tokens(p, params, seed, VOCAB, {EOS})[0], f"request {rid}"
    bm = sched.block_manager
    assert bm.num_used_blocks == 0 and bm.num_free_blocks + bm.num_evictable_blocks == bm.num_blocks


shared_workload = st.lists(
    st.tuples(
        st.integers(0, 2),  # which shared prefix
        st.integers(0, 30),  # its length
        st.integers(0, 10),  # own suffix length
        st.integers(1, 10),  # max_tokens
        st.booleans(),  # greedy
        st.integers(0, 8),  # arrives at this loop iteration
    ),
    min_size=1,
    max_size=10,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    specs=shared_workload,
    block_size=st.sampled_from([1, 2, 4, 8]),
    spare_blocks=st.integers(0, 20),
    max_num_seqs=st.integers(1, 6),
    extra_budget=st.integers(0, 30),
    overlap=st.booleans(),
    aborts=st.lists(st.tuples(st.integers(0, 9), st.integers(0, 20)), max_size=2),
)
def test_random_shared_prefix_workloads_match_the_uncached_reference(
    specs, block_size, spare_blocks, max_num_seqs, extra_budget, overlap, aborts
) -> None:
    prompts = []
    for i, (which, plen, slen, *_rest) in enumerate(specs):
        p = tokens(plen, seed=which)[:plen] + tokens(slen, seed=1000 + i)
        prompts.append(p or [1])
    longest = max(len(p) + m - 1 for p, (*_x, m, _g, _a) in zip(prompts, specs))
    sched, dev = make(
        num_blocks=-(-longest // block_size) + spare_blocks,
        block_size=block_size,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_seqs + extra_budget,
    )
    reqs: dict[int, tuple] = {}
    aborted: set[int] = set()

    def between(it: int) -> None:
        for i, (_w, _p, _s, m, is_greedy, at) in enumerate(specs):
            if at == it:
                params = SamplingParams(max_tokens=m, temperature=0.0 if is_greedy else 1.0, ignore_eos=True)
                reqs[i] = (prompts[i], params, sched.add_request(i, prompts[i], params).seed)
        for rid, at in aborts:
            if at == it and sched.abort(rid):
                aborted.add(rid)
                check_blocks(sched)

    log = (run_overlap if overlap else run_sync)(sched, dev, between=between, min_iters=31)
    s = sched.stats
    event(f"hits: {s.prefix_hit_tokens > 0}, evicted: {sched.block_manager.num_evictions > 0}, "
          f"preempted: {s.num_preemptions > 0}")
    bm = sched.block_manager
    assert bm.num_used_blocks == 0 and not sched.has_work()
    assert bm.num_free_blocks + bm.num_evictable_blocks == bm.num_blocks
    assert bm.num_cached_blocks == bm.num_evictable_blocks
    bm.check()
    for rid, (p, params, seed) in reqs.items():
        want, _ = reference_tokens(p, params, seed, VOCAB, {EOS})
        got = log.tokens.get(rid, [])
        assert got == (want[: len(got)] if rid in aborted else want), f"request {rid}"
