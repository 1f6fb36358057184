"""A request's table against the prefix cache: what it can reuse, what it can offer.

Two calls, both on a sequence whose tokens are `prompt + outputs` with
possibly some in flight (the scheduler's Request):
- `cached_prefix`, at admission: the cached blocks its sequence starts with,
  never all of it, since the last token must be computed to sample from;
- `cache_full_blocks`, as it runs and when it leaves: key the blocks of its
  table whose every position is computed (or scheduled) and whose tokens are
  all known on the host, so that later requests can share them.
"""

from __future__ import annotations

from typing import Protocol

from .block_manager import BlockManager


class KeyedSequence(Protocol):
    block_ids: list[int]
    block_keys: list[bytes]  # keys of its leading full blocks; they depend on the tokens only
    num_keyed_blocks: int  # leading blocks of `block_ids` that are cached
    num_computed_tokens: int

    @property
    def num_tokens(self) -> int: ...

    @property
    def num_known_tokens(self) -> int: ...

    def token_ids_slice(self, start: int, end: int) -> list[int]: ...


def cached_prefix(bm: BlockManager, seq: KeyedSequence) -> list[int]:
    """Cached blocks for the start of a sequence whose tokens are all known (no holds taken)."""
    limit = (seq.num_tokens - 1) // bm.block_size
    _extend_keys(bm, seq, limit)
    return bm.cached_prefix(seq.block_keys[:limit])


def cache_full_blocks(bm: BlockManager, seq: KeyedSequence) -> None:
    """Key the table's blocks whose positions are all computed and whose tokens are all known."""
    full = min(seq.num_computed_tokens, seq.num_known_tokens) // bm.block_size
    if full <= seq.num_keyed_blocks:
        return
    _extend_keys(bm, seq, full)
    for i in range(seq.num_keyed_blocks, full):
        bm.cache_block(seq.block_ids[i], seq.block_keys[i])  # False: another block has it; this one stays private
    seq.num_keyed_blocks = full


def _extend_keys(bm: BlockManager, seq: KeyedSequence, num_blocks: int) -> None:
    keys, bs = seq.block_keys, bm.block_size
    if len(keys) < num_blocks and bm.prefix_cache is not None:
        bm.prefix_cache.extend_keys(keys, seq.token_ids_slice(len(keys) * bs, num_blocks * bs), bs)
