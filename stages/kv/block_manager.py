"""Paged KV cache blocks: who holds which block, with exact accounting.

A block holds `block_size` consecutive token positions of one request. Blocks
are handed out on demand (a prefill chunk or a decode step needs only the
blocks its new positions land in) and returned all at once when the request
finishes, is aborted or is preempted. There is no prefix caching, so a block
has at most one owner and no reference count.
"""

from __future__ import annotations

from collections import deque


class BlockError(RuntimeError):
    """An accounting violation: over-allocation, double free, unknown block."""


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        # Lowest ids first, and freed blocks go to the back: reuse order is
        # deterministic, which keeps runs reproducible block for block.
        self._free: deque[int] = deque(range(num_blocks))
        self._in_use = bytearray(num_blocks)  # 1 = allocated; catches double frees

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_for_tokens(self, num_tokens: int) -> int:
        """Blocks needed to hold `num_tokens` positions."""
        return -(-num_tokens // self.block_size)

    def num_new_blocks(self, block_ids: list[int], num_tokens: int) -> int:
        """Blocks a table must gain to hold `num_tokens` positions."""
        return max(0, self.blocks_for_tokens(num_tokens) - len(block_ids))

    def tokens_that_fit(self, block_ids: list[int], num_computed: int) -> int:
        """New positions after `num_computed` that the table plus every free block could hold."""
        capacity = (len(block_ids) + len(self._free)) * self.block_size
        return max(0, capacity - num_computed)

    def allocate(self, n: int) -> list[int]:
        if n < 0:
            raise BlockError(f"cannot allocate {n} blocks")
        if n > len(self._free):
            raise BlockError(f"asked for {n} blocks but only {len(self._free)} are free")
        out = [self._free.popleft() for _ in range(n)]
        for b in out:
            self._in_use[b] = 1
        return out

    def grow(self, block_ids: list[int], num_tokens: int) -> None:
        """Extend `block_ids` in place so it holds `num_tokens` positions."""
        need = self.num_new_blocks(block_ids, num_tokens)
        if need:  # most decode steps land in the last block: nothing to allocate
            block_ids.extend(self.allocate(need))

    def free(self, block_ids: list[int]) -> None:
        """Return every block of a table; the whole call fails if any id is bad."""
        seen: set[int] = set()
        for b in block_ids:
            if not 0 <= b < self.num_blocks:
                raise BlockError(f"block {b} does not exist (0..{self.num_blocks - 1})")
            if not self._in_use[b] or b in seen:
                raise BlockError(f"block {b} is already free")
            seen.add(b)
        for b in block_ids:
            self._in_use[b] = 0
            self._free.append(b)

    def check(self) -> None:
        """Verify the free list against the in-use map (tests and debugging)."""
        free = set(self._free)
        if len(free) != len(self._free):
            raise BlockError("a block is on the free list twice")
        for b in range(self.num_blocks):
            if (b in free) == bool(self._in_use[b]):
                raise BlockError(f"block {b} is both free and in use, or neither")
