"""Prompt-lookup proposals: what followed the last n tokens the previous time they occurred.

No weights: the proposal is a function of the request's known tokens
(prompt + outputs), so a request proposes the same drafts whether it runs
alone or in a crowd, with or without overlap, and after preemption. The
planner keeps those tokens per request in a `TokenHistory`, an array that
grows by the new outputs, because turning the lists into an array every
step cost more than the search itself (`bench/ngram_proposer.py`, one row
at 4,096 tokens: 70 us a step from the lists, 10 us from the history).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

# Only the most recent tokens are searched: the cost per step stays bounded
# for long sequences, and recent context is where repetition pays.
SEARCH_WINDOW = 4096


class TokenHistory:
    """One request's known tokens as an int64 array that only grows (prompt,
    then outputs as they are kept; both lists only ever append)."""

    __slots__ = ("_buf", "_len", "_prompt_len")

    def __init__(self, prompt: Sequence[int]) -> None:
        self._prompt_len = len(prompt)
        self._buf = np.empty(max(64, 2 * self._prompt_len), np.int64)
        self._buf[: self._prompt_len] = prompt
        self._len = self._prompt_len

    def tokens(self, outputs: Sequence[int], assumed: Sequence[int] = ()) -> np.ndarray:
        """prompt + outputs + `assumed` (tokens not kept: written past the end
        and overwritten later). A view, valid until the next call."""
        new = self._prompt_len + len(outputs) - self._len
        end = self._len + max(new, 0) + len(assumed)
        if end > len(self._buf):
            grown = np.empty(max(end, 2 * len(self._buf)), np.int64)
            grown[: self._len] = self._buf[: self._len]
            self._buf = grown
        if new > 0:
            self._buf[self._len: self._len + new] = outputs[len(outputs) - new:]
            self._len += new
        if assumed:
            self._buf[self._len: end] = assumed
        return self._buf[:end]


def propose_ngram(tokens: Sequence[int] | np.ndarray, k: int, ngram_max: int, ngram_min: int) -> list[int]:
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
