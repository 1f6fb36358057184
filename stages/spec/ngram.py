"""Prompt-lookup proposals: what followed the last n tokens the previous time they occurred.

No weights and no state: the proposal is a function of the request's known
tokens (prompt + outputs), so a request proposes the same drafts whether it
runs alone or in a crowd, with or without overlap, and after preemption.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

# Only the most recent tokens are searched: the cost per step stays bounded
# for long sequences, and recent context is where repetition pays.
SEARCH_WINDOW = 4096


def propose_ngram(tokens: Sequence[int], k: int, ngram_max: int, ngram_min: int) -> list[int]:
    """Up to `k` tokens that followed the most recent earlier occurrence of the
    last n tokens, for the largest n in [ngram_min, ngram_max] that occurs; [] if none."""
    if k < 1 or len(tokens) < ngram_min + 1:
        return []
    arr = np.asarray(tokens[-SEARCH_WINDOW:], dtype=np.int64)
    size = len(arr)
    # Where an earlier occurrence could end: the last token's earlier positions
    # (one pass over the window), then narrowed one token back at a time.
    ends = np.flatnonzero(arr[: size - 1] == arr[size - 1])
    best = -1
    for n in range(1, min(ngram_max, size - 1) + 1):
        if n > 1:
            ends = ends[ends >= n - 1]
            ends = ends[arr[ends - (n - 1)] == arr[size - n]]
        if ends.size == 0:
            break
        if n >= ngram_min:
            best = int(ends[-1])  # the most recent occurrence of the longest n so far
    if best < 0:
        return []
    return arr[best + 1: best + 1 + k].tolist()
