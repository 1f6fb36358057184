"""Automatic prefix caching: full KV blocks found again by the tokens they hold.

A full block's key chains the keys before it, like a hash list:

    key(0) = H(salt, tokens of block 0)        key(i) = H(key(i-1), tokens of block i)

so equal keys mean equal token prefixes, and equal prefixes mean equal keys
and values in the block. The salt names everything else the KV depends on
(model, weights, dtype, runtime, block size): one process serves one model,
but a key that did not say so would be a trap for whoever shares a pool
between configurations later.

What this module keeps is only the map key <-> block and the pool of cached
blocks nobody holds (evictable, least recently released first); the block
manager owns reference counts and decides when to evict. Keys are 16-byte
BLAKE2b digests: a collision would silently hand one prompt another's KV, so
the hash must be cryptographic, not Python's `hash()`.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from typing import Sequence

KEY_BYTES = 16


def cache_salt(*parts: object) -> bytes:
    """The root of every key chain: a digest of what the KV depends on besides the tokens."""
    return hashlib.blake2b(repr(parts).encode(), digest_size=KEY_BYTES).digest()


def block_key(parent: bytes, token_ids: Sequence[int]) -> bytes:
    """The key of a full block holding `token_ids`, after the block keyed `parent` (or the salt)."""
    h = hashlib.blake2b(parent, digest_size=KEY_BYTES)
    h.update(array("q", token_ids).tobytes())  # ids are < 2**31; 8 bytes each leaves no doubt
    return h.digest()


class PrefixCache:
    def __init__(self, salt: bytes) -> None:
        self.salt = salt
        self._block_of: dict[bytes, int] = {}
        self._key_of: dict[int, bytes] = {}
        # Cached blocks with no holder, oldest release first: the next to go
        # when the manager runs out of empty blocks.
        self._evictable: OrderedDict[int, None] = OrderedDict()

    @property
    def num_cached(self) -> int:
        """Blocks that hold a keyed prefix, held by a request or not."""
        return len(self._key_of)

    @property
    def num_evictable(self) -> int:
        return len(self._evictable)

    def extend_keys(self, keys: list[bytes], new_tokens: Sequence[int], block_size: int) -> None:
        """Append to `keys` (a sequence's block keys so far) the keys of the full
        blocks in `new_tokens`, the tokens that follow those blocks."""
        parent = keys[-1] if keys else self.salt
        for i in range(len(new_tokens) // block_size):
            parent = block_key(parent, new_tokens[i * block_size: (i + 1) * block_size])
            keys.append(parent)

    def longest_prefix(self, keys: Sequence[bytes]) -> list[int]:
        """The cached blocks of the longest run of `keys` from the start."""
        out: list[int] = []
        for k in keys:
            b = self._block_of.get(k)
            if b is None:
                break
            out.append(b)
        return out

    def is_cached(self, block: int) -> bool:
        return block in self._key_of

    def is_evictable(self, block: int) -> bool:
        return block in self._evictable

    def insert(self, key: bytes, block: int) -> bool:
        """Key `block`; False when another block already holds this prefix (two
        requests computed it at once): the first stays, this one stays private."""
        if key in self._block_of or block in self._key_of:
            return False
        self._block_of[key] = block
        self._key_of[block] = key
        return True

    def park(self, block: int) -> None:
        """Its last holder left: keep it, evictable, as the most recently released."""
        self._evictable[block] = None

    def unpark(self, block: int) -> None:
        """A request took an evictable block back."""
        del self._evictable[block]

    def evict(self) -> int:
        """Forget the least recently released evictable block and hand it out for new content."""
        block, _ = self._evictable.popitem(last=False)
        del self._block_of[self._key_of.pop(block)]
        return block

    def clear(self) -> list[int]:
        """Forget every key (held blocks stay with their holders); returns the evictable blocks, now empty."""
        freed = list(self._evictable)
        self._evictable.clear()
        self._block_of.clear()
        self._key_of.clear()
        return freed

    def check(self, ref_counts: Sequence[int]) -> None:
        """Verify the two maps mirror each other and the pool holds exactly the unheld cached blocks."""
        if len(self._block_of) != len(self._key_of):
            raise AssertionError("key and block maps differ in size")
        for b, k in self._key_of.items():
            if self._block_of.get(k) != b:
                raise AssertionError(f"block {b}'s key maps elsewhere")
            if (ref_counts[b] == 0) != (b in self._evictable):
                raise AssertionError(f"cached block {b} with {ref_counts[b]} holders is evictable: {b in self._evictable}")
        for b in self._evictable:
            if b not in self._key_of:
                raise AssertionError(f"evictable block {b} holds no key")
