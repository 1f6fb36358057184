"""The RequestSink of one HTTP request: the emit stage pushes, the handler task pulls.

The emit stage must never wait for an HTTP client, so `on_tokens` only
appends and wakes the handler. A client that reads slower than the engine
produces piles up events; past `max_events` the sink ends itself (`slow`) and
the handler aborts the request, freeing its KV blocks.
"""

from __future__ import annotations

import asyncio
import collections
import time
from typing import NamedTuple

from ..engine_api import TokenLogprob
from .metrics import HttpMetrics


class Piece(NamedTuple):
    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprob] | None


class Finished(NamedTuple):
    reason: str  # SPEC finish reasons: eos, stop, length, aborted, error
    prompt_tokens: int
    completion_tokens: int


class Failed(NamedTuple):
    code: str  # engine error codes (engine_api.ENGINE_ERROR_CODES)
    message: str


class HttpSink:
    """Ends once: the first of on_done, on_error or an overflow wins."""

    def __init__(self, max_events: int, metrics: HttpMetrics) -> None:
        self._pieces: collections.deque[Piece] = collections.deque()
        self._wake = asyncio.Event()
        self._max = max_events
        self._metrics = metrics
        self._started = time.perf_counter()
        self._last: float | None = None
        self.end: Finished | Failed | None = None
        self.engine_ended = False  # False after an overflow: the engine still runs it, abort it

    # -- RequestSink, called by the emit stage on the loop thread
    def on_tokens(self, token_ids: list[int], text: str, logprobs: list[TokenLogprob] | None) -> None:
        if self.end is not None:
            return
        now = time.perf_counter()
        if self._last is None:
            self._metrics.ttft.observe(now - self._started)
        elif token_ids:
            gap = (now - self._last) / len(token_ids)
            for _ in token_ids:
                self._metrics.itl.observe(gap)
        self._last = now
        if len(self._pieces) >= self._max:
            self.end = Failed("overloaded", f"The client read {self._max} token events behind the engine; it was cut off.")
        else:
            self._pieces.append(Piece(token_ids, text, logprobs))
        self._wake.set()

    def on_done(self, finish_reason: str, prompt_tokens: int, completion_tokens: int) -> None:
        if self.end is None:
            self.engine_ended = True
            self.end = Finished(finish_reason, prompt_tokens, completion_tokens)
            self._wake.set()

    def on_error(self, code: str, message: str) -> None:
        if self.end is None:
            self.engine_ended = True
            self.end = Failed(code, message)
            self._wake.set()

    # -- the handler's side
    async def next_pieces(self) -> list[Piece]:
        """Everything produced since the last call; [] once the request has ended and all was read."""
        while not self._pieces and self.end is None:
            self._wake.clear()
            await self._wake.wait()
        pieces = list(self._pieces)
        self._pieces.clear()
        return pieces

    @property
    def elapsed_s(self) -> float:
        return time.perf_counter() - self._started
