"""Prompt encoding on a small thread pool, so the event loop never waits for it.

Encoding is the one per-request cost that grows with the client's input: ~1 s
for 1 MiB of text with the tiny model's byte-level BPE, during which every
stream of every client would stop if it ran on the loop. The `tokenizers`
library releases the GIL in `encode_batch` (its `encode` holds the GIL for
the whole call: a 1 MiB `encode` on a worker thread still froze the loop for
1.36 s in the check behind docs/reliability.md), so workers call that.

Bounded twice: `workers` threads, and at most `max_pending` texts accepted
and not yet encoded (the pipeline passes its `max_waiting`: a text being
encoded is a waiting request); `full` tells it to answer `overloaded`. A
text is at most one frame (1 MiB by default).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from typing import Any

DEFAULT_WORKERS = 2
DEFAULT_MAX_PENDING = 64


def encode_releasing_gil(tokenizer: Any, text: str) -> list[int]:
    """`tokenizer.encode(text)`, through a call that lets other threads run where the tokenizer has one."""
    many = getattr(tokenizer, "encode_many", None)
    return many([text])[0] if many is not None else tokenizer.encode(text)


class TokenizePool:
    def __init__(self, tokenizer: Any, workers: int = DEFAULT_WORKERS, max_pending: int = DEFAULT_MAX_PENDING) -> None:
        if workers < 1 or max_pending < 1:
            raise ValueError(f"workers ({workers}) and max_pending ({max_pending}) must be >= 1")
        self._tokenizer = tokenizer
        self._executor = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="overlapd-tokenize")
        self.max_pending = max_pending
        self.pending = 0  # submitted, not yet encoded (queued or on a worker)
        self.encoded = 0

    @property
    def full(self) -> bool:
        return self.pending >= self.max_pending

    def encode(self, text: str) -> asyncio.Future[list[int]]:
        """The text's token ids, to await (on the loop that calls this); it counts as
        pending from this call on. Raises RuntimeError when the pool is full (check `full` first)."""
        if self.full:
            raise RuntimeError(f"{self.pending} prompts are already being tokenized (the bound)")
        self.pending += 1
        fut = asyncio.wrap_future(self._executor.submit(encode_releasing_gil, self._tokenizer, text))
        fut.add_done_callback(self._finished)
        return fut

    def _finished(self, fut: asyncio.Future[list[int]]) -> None:
        self.pending -= 1
        if not fut.cancelled() and fut.exception() is None:
            self.encoded += 1

    def shutdown(self) -> None:
        """Drop texts not started; a text being encoded finishes on its thread, unawaited."""
        self._executor.shutdown(wait=False, cancel_futures=True)
