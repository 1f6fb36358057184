"""Engine output -> OpenAI response objects, for /v1/completions and /v1/chat/completions.

One format object per request; it turns the sink's pieces into stream chunks
or, at the end, into the whole answer, so the endpoints share one generation
loop (handlers.py) and differ only here.
"""

from __future__ import annotations

import itertools
import secrets
import time
from collections.abc import Callable
from typing import Final

import msgspec

from .params import finite
from .schemas import (
    AssistantMessage,
    ChatChoice,
    ChatChunk,
    ChatChunkChoice,
    ChatCompletion,
    ChatDelta,
    ChatLogprobs,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    TokenLogprobEntry,
    TopLogprob,
    Usage,
)
from .sink import Finished, Piece

# SPEC finish reasons -> OpenAI's (eos and a stop string/token are both "stop")
FINISH: Final = {"eos": "stop", "stop": "stop", "length": "length", "aborted": "abort", "error": "error"}

TokenTexts = Callable[[list[int]], list[str]]

# Response ids: a random prefix per process and a counter (os.urandom per
# request measured ~0.1 ms on a loaded 2-core machine).
_ID_PREFIX: Final = secrets.token_hex(6)
_ID_COUNTER = itertools.count(1)


def response_id(kind: str) -> str:
    return f"{kind}-{_ID_PREFIX}{next(_ID_COUNTER):012x}"


def usage_of(end: Finished) -> Usage:
    return Usage(end.prompt_tokens, end.completion_tokens, end.prompt_tokens + end.completion_tokens)


class CompletionFormat:
    def __init__(self, model: str, token_texts: TokenTexts, top_logprobs: int | None) -> None:
        self.id = response_id("cmpl")
        self.created = int(time.time())
        self.model = model
        self._texts = token_texts
        self._top = top_logprobs  # None: no logprobs asked for
        self._offset = 0  # characters of text sent so far, for text_offset

    def _logprobs(self, pieces: list[Piece]) -> CompletionLogprobs | None:
        if self._top is None:
            return None
        out = CompletionLogprobs([], [], [], [])
        for piece in pieces:
            for lp in piece.logprobs or ():
                names = self._texts([lp.token_id] + [t for t, _ in lp.top[: self._top]])
                out.tokens.append(names[0])
                out.token_logprobs.append(finite(lp.logprob))
                out.top_logprobs.append({n: finite(v) for n, (_, v) in zip(names[1:], lp.top)})
                out.text_offset.append(self._offset)
                self._offset += len(names[0])
        return out

    def _choice(self, pieces: list[Piece], finish: str | None) -> CompletionChoice:
        return CompletionChoice(0, "".join(p.text for p in pieces), self._logprobs(pieces), finish)

    def start(self) -> list[msgspec.Struct]:
        return []

    def chunk(self, pieces: list[Piece]) -> msgspec.Struct:
        return Completion(self.id, self.created, self.model, [self._choice(pieces, None)])

    def last(self, end: Finished) -> msgspec.Struct:
        return Completion(self.id, self.created, self.model, [self._choice([], FINISH[end.reason])])

    def usage_chunk(self, end: Finished) -> msgspec.Struct:
        return Completion(self.id, self.created, self.model, [], usage_of(end))

    def whole(self, pieces: list[Piece], end: Finished) -> msgspec.Struct:
        return Completion(self.id, self.created, self.model, [self._choice(pieces, FINISH[end.reason])], usage_of(end))


class ChatFormat:
    def __init__(self, model: str, token_texts: TokenTexts, top_logprobs: int | None) -> None:
        self.id = response_id("chatcmpl")
        self.created = int(time.time())
        self.model = model
        self._texts = token_texts
        self._top = top_logprobs

    def _logprobs(self, pieces: list[Piece]) -> ChatLogprobs | None:
        if self._top is None:
            return None
        content = []
        for piece in pieces:
            for lp in piece.logprobs or ():
                names = self._texts([lp.token_id] + [t for t, _ in lp.top[: self._top]])
                tops = [TopLogprob(n, finite(v), list(n.encode())) for n, (_, v) in zip(names[1:], lp.top)]
                content.append(TokenLogprobEntry(names[0], finite(lp.logprob), list(names[0].encode()), tops))
        return ChatLogprobs(content)

    def _chunk(self, delta: ChatDelta, logprobs: ChatLogprobs | None, finish: str | None) -> ChatChunk:
        return ChatChunk(self.id, self.created, self.model, [ChatChunkChoice(0, delta, logprobs, finish)])

    def start(self) -> list[msgspec.Struct]:
        return [self._chunk(ChatDelta(role="assistant", content=""), None, None)]

    def chunk(self, pieces: list[Piece]) -> msgspec.Struct:
        return self._chunk(ChatDelta(content="".join(p.text for p in pieces)), self._logprobs(pieces), None)

    def last(self, end: Finished) -> msgspec.Struct:
        return self._chunk(ChatDelta(), None, FINISH[end.reason])

    def usage_chunk(self, end: Finished) -> msgspec.Struct:
        return ChatChunk(self.id, self.created, self.model, [], usage_of(end))

    def whole(self, pieces: list[Piece], end: Finished) -> msgspec.Struct:
        message = AssistantMessage("".join(p.text for p in pieces))
        choice = ChatChoice(0, message, self._logprobs(pieces), FINISH[end.reason])
        return ChatCompletion(self.id, self.created, self.model, [choice], usage_of(end))


ResponseFormat = CompletionFormat | ChatFormat
