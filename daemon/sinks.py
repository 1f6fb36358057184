"""In-process RequestSinks: for `overlapd generate`, the benches and the tests,
which drive the pipeline directly instead of through the socket server."""

from __future__ import annotations

import asyncio
import sys
from typing import Any


class RequestFailed(RuntimeError):
    """The request ended with an `error` (code: message)."""


class CollectSink:
    """Keeps a request's tokens and text; `done` resolves to the finish reason."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.tokens: list[int] = []
        self.text: list[str] = []
        self.done: asyncio.Future[str] = loop.create_future()
        self.usage: tuple[int, int] = (0, 0)  # prompt tokens, completion tokens

    def on_tokens(self, token_ids: list[int], text: str, logprobs: Any) -> None:
        self.tokens.extend(token_ids)
        self.text.append(text)

    def on_done(self, finish_reason: str, prompt_tokens: int, completion_tokens: int) -> None:
        if not self.done.done():
            self.usage = (prompt_tokens, completion_tokens)
            self.done.set_result(finish_reason)

    def on_error(self, code: str, message: str) -> None:
        if not self.done.done():
            self.done.set_exception(RequestFailed(f"{code}: {message}"))


class PrintSink(CollectSink):
    """Also streams the text to stdout as it arrives."""

    def on_tokens(self, token_ids: list[int], text: str, logprobs: Any) -> None:
        super().on_tokens(token_ids, text, logprobs)
        sys.stdout.write(text)
        sys.stdout.flush()
