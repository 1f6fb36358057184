"""The KV block allocator: exact accounting, no over-allocation, no double free."""

from __future__ import annotations

import random

import pytest
from overlapd.stages.kv.block_manager import BlockError, BlockManager


def test_allocate_and_free_keep_exact_counts() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    a = bm.allocate(3)
    b = bm.allocate(5)
    assert sorted(a + b) == list(range(8))
    assert bm.num_free_blocks == 0 and bm.num_used_blocks == 8
    bm.free(a)
    assert bm.num_free_blocks == 3
    bm.check()


def test_over_allocation_raises_and_changes_nothing() -> None:
    bm = BlockManager(num_blocks=4, block_size=16)
    bm.allocate(3)
    with pytest.raises(BlockError, match="only 1 are free"):
        bm.allocate(2)
    assert bm.num_free_blocks == 1
    with pytest.raises(BlockError):
        bm.allocate(-1)


def test_double_free_and_unknown_block_raise_without_partial_effect() -> None:
    bm = BlockManager(num_blocks=4, block_size=16)
    a = bm.allocate(2)
    bm.free([a[0]])
    with pytest.raises(BlockError, match="already free"):
        bm.free([a[1], a[0]])  # a[1] must not be freed by the failed call
    assert bm.num_free_blocks == 3
    with pytest.raises(BlockError, match="already free"):
        bm.free([a[1], a[1]])
    with pytest.raises(BlockError, match="does not exist"):
        bm.free([4])
    bm.free([a[1]])
    assert bm.num_free_blocks == 4
    bm.check()


def test_grow_allocates_on_demand() -> None:
    bm = BlockManager(num_blocks=10, block_size=4)
    table: list[int] = []
    bm.grow(table, 1)
    assert len(table) == 1
    bm.grow(table, 4)
    assert len(table) == 1  # position 3 still fits the first block
    bm.grow(table, 5)
    assert len(table) == 2
    bm.grow(table, 32)
    assert len(table) == 8 and bm.num_free_blocks == 2
    assert bm.tokens_that_fit(table, 32) == 8  # the two free blocks
    with pytest.raises(BlockError):
        bm.grow(table, 41)
    assert len(table) == 8


def test_blocks_for_tokens() -> None:
    bm = BlockManager(num_blocks=1, block_size=16)
    assert [bm.blocks_for_tokens(n) for n in (0, 1, 16, 17, 32)] == [0, 1, 1, 2, 2]
    with pytest.raises(ValueError):
        BlockManager(num_blocks=0, block_size=16)


def test_random_allocations_match_a_reference_count() -> None:
    rng = random.Random(7)
    bm = BlockManager(num_blocks=50, block_size=8)
    tables: list[list[int]] = []
    for _ in range(2000):
        if tables and rng.random() < 0.4:
            bm.free(tables.pop(rng.randrange(len(tables))))
        else:
            n = rng.randrange(0, 8)
            if n > bm.num_free_blocks:
                with pytest.raises(BlockError):
                    bm.allocate(n)
            else:
                tables.append(bm.allocate(n))
        held = [b for t in tables for b in t]
        assert len(set(held)) == len(held) == bm.num_used_blocks
    bm.check()
