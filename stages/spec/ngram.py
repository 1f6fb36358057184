"""Prompt-lookup proposals: what followed the last n tokens the previous time they occurred.

No weights and no state: the proposal is a function of the request's known
tokens (prompt + outputs), so a request proposes the same drafts whether it
runs alone or in a crowd, with or without overlap, and after preemption.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

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
    for n in range(min(ngram_max, size - 1), ngram_min - 1, -1):
        # windows that start at 0 .. size-n-1: every n-gram but the suffix itself
        windows = sliding_window_view(arr[: size - 1], n)
        hits = np.flatnonzero((windows == arr[size - n:]).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n  # what followed the most recent match
            return arr[start: start + k].tolist()
    return []
