"""Paged KV cache blocks: who holds which block, with exact accounting.

A block holds `block_size` consecutive token positions. Blocks are handed out
on demand (a prefill chunk or a decode step needs only the blocks its new
positions land in) and given back all at once when the request finishes, is
aborted or is preempted.

With a prefix cache (stages/kv/prefix_cache.py) a full block can also carry a
key and be held by several requests at once, so every block has a reference
count, and a block is in exactly one of three states:

- free: holds nothing, on the free list;
- used: held by at least one request (its reference count);
- evictable: cached, held by nobody, kept until its space is needed.

`allocate` takes free blocks first and only then evicts the least recently
released cached ones, so the cache drains before the scheduler has to
preempt anyone (`tokens_that_fit` counts both kinds).

Blocks are returned as soon as their request leaves, even with steps that
use them still in flight: steps run in launch order on the device, so a step
that writes a block handed to someone else runs after every step that read it.
"""

from __future__ import annotations

from collections import deque
from typing import Sequence

from .prefix_cache import PrefixCache


class BlockError(RuntimeError):
    """An accounting violation: over-allocation, double free, unknown block."""


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, prefix_salt: bytes | None = None) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        # Lowest ids first, and freed blocks go to the back: reuse order is
        # deterministic, which keeps runs reproducible block for block.
        self._free: deque[int] = deque(range(num_blocks))
        self._refs = [0] * num_blocks  # holders of each block; 0 = free or evictable
        self.prefix_cache = PrefixCache(prefix_salt) if prefix_salt is not None else None
        self.num_evictions = 0

    # ---- counts ----------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        """Blocks that hold nothing."""
        return len(self._free)

    @property
    def num_evictable_blocks(self) -> int:
        """Cached blocks no request holds: reclaimed when the free ones run out."""
        return self.prefix_cache.num_evictable if self.prefix_cache is not None else 0

    @property
    def num_cached_blocks(self) -> int:
        """Blocks holding a keyed prefix, held or evictable."""
        return self.prefix_cache.num_cached if self.prefix_cache is not None else 0

    @property
    def num_available_blocks(self) -> int:
        """Blocks an allocation can take now: free plus evictable."""
        return len(self._free) + self.num_evictable_blocks

    @property
    def num_used_blocks(self) -> int:
        """Blocks held by at least one request."""
        return self.num_blocks - self.num_available_blocks

    def ref_count(self, block: int) -> int:
        return self._refs[block]

    def blocks_for_tokens(self, num_tokens: int) -> int:
        """Blocks needed to hold `num_tokens` positions."""
        return -(-num_tokens // self.block_size)

    def num_new_blocks(self, block_ids: list[int], num_tokens: int) -> int:
        """Blocks a table must gain to hold `num_tokens` positions."""
        return max(0, self.blocks_for_tokens(num_tokens) - len(block_ids))

    def tokens_that_fit(self, block_ids: list[int], num_computed: int) -> int:
        """New positions after `num_computed` that the table plus every available block could hold."""
        capacity = (len(block_ids) + self.num_available_blocks) * self.block_size
        return max(0, capacity - num_computed)

    # ---- plain allocation ------------------------------------------------

    def allocate(self, n: int) -> list[int]:
        if n < 0:
            raise BlockError(f"cannot allocate {n} blocks")
        if n > self.num_available_blocks:
            raise BlockError(f"asked for {n} blocks but only {self.num_available_blocks} are free")
        out = []
        for _ in range(n):
            if self._free:
                b = self._free.popleft()
            else:  # the free list ran dry: reclaim the oldest cached prefix
                assert self.prefix_cache is not None
                b = self.prefix_cache.evict()
                self.num_evictions += 1
            self._refs[b] = 1
            out.append(b)
        return out

    def grow(self, block_ids: list[int], num_tokens: int) -> None:
        """Extend `block_ids` in place so it holds `num_tokens` positions."""
        need = self.num_new_blocks(block_ids, num_tokens)
        if need:  # most decode steps land in the last block: nothing to allocate
            block_ids.extend(self.allocate(need))

    def free(self, block_ids: list[int]) -> None:
        """Drop one hold on every block of a table; the whole call fails if any id is bad.

        A block whose last holder left goes back to the free list, or, when it
        is cached, to the evictable pool: the table's last blocks first, so the
        pool evicts a prefix's tail before its head (heads are what others share).
        """
        seen: set[int] = set()
        for b in block_ids:
            if not 0 <= b < self.num_blocks:
                raise BlockError(f"block {b} does not exist (0..{self.num_blocks - 1})")
            if not self._refs[b] or b in seen:
                raise BlockError(f"block {b} is already free")
            seen.add(b)
        cache = self.prefix_cache
        for b in reversed(block_ids) if cache is not None else ():
            if self._refs[b] == 1 and cache.is_cached(b):
                cache.park(b)
        for b in block_ids:
            self._refs[b] -= 1
            if not self._refs[b] and (cache is None or not cache.is_cached(b)):
                self._free.append(b)

    # ---- prefix cache ----------------------------------------------------

    def cached_prefix(self, keys: Sequence[bytes]) -> list[int]:
        """The cached blocks matching the longest run of `keys` from the start (no holds taken)."""
        return self.prefix_cache.longest_prefix(keys) if self.prefix_cache is not None else []

    def tokens_that_fit_after(self, hits: Sequence[int]) -> int:
        """New positions a table starting with the cached blocks `hits` could hold after them:
        taking a hit out of the evictable pool leaves one block less for new content."""
        cache = self.prefix_cache
        taken = sum(1 for b in hits if cache is not None and cache.is_evictable(b))
        return (self.num_available_blocks - taken) * self.block_size

    def take(self, hits: Sequence[int]) -> list[int]:
        """Hold the cached blocks `hits` (from cached_prefix) for a new table; returns that table."""
        cache = self.prefix_cache
        for b in hits:
            if cache is None or not cache.is_cached(b):
                raise BlockError(f"block {b} is not cached")
            if self._refs[b] == 0:
                cache.unpark(b)
            self._refs[b] += 1
        return list(hits)

    def cache_block(self, block: int, key: bytes) -> bool:
        """Key a full, computed block so later requests can share it; False if that prefix
        is already cached in another block (this one stays private)."""
        if self.prefix_cache is None or self._refs[block] == 0:
            raise BlockError(f"block {block} cannot be cached: prefix caching is off or nobody holds it")
        return self.prefix_cache.insert(key, block)

    def clear_cache(self) -> None:
        """Forget every cached prefix (after a failed step, whose blocks may hold garbage)."""
        if self.prefix_cache is not None:
            self._free.extend(self.prefix_cache.clear())

    def check(self) -> None:
        """Verify free list, reference counts and cache against each other (tests and debugging)."""
        free = set(self._free)
        if len(free) != len(self._free):
            raise BlockError("a block is on the free list twice")
        cache = self.prefix_cache
        for b in range(self.num_blocks):
            if self._refs[b] < 0:
                raise BlockError(f"block {b} has {self._refs[b]} holders")
            cached = cache is not None and cache.is_cached(b)
            if (b in free) != (self._refs[b] == 0 and not cached):
                raise BlockError(f"block {b}: on the free list {b in free}, {self._refs[b]} holders, cached {cached}")
        if cache is not None:
            try:
                cache.check(self._refs)
            except AssertionError as exc:
                raise BlockError(str(exc)) from None
