"""What the sync and asyncio clients share: exceptions, request building,
routing of daemon frames to the request they belong to, and results."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable
from typing import Final

import msgspec

from .config import SYSTEMD_SOCKET_PATH, default_socket_path
from .protocol import (
    AcceptedFrame,
    DaemonFrame,
    DoneFrame,
    ErrorFrame,
    GenerateFrame,
    TokenLogprob,
    TokensFrame,
    Usage,
)

DEFAULT_TIMEOUT_S: Final = 60.0
# Frames the daemon may send us that the caller has not consumed yet, across
# all streams of one connection: past this the caller is not reading its
# streams and we stop rather than grow.
DEFAULT_MAX_UNREAD_FRAMES: Final = 100_000
CLIENT_MAX_FRAME_BYTES: Final = 16 << 20

Event = AcceptedFrame | TokensFrame | DoneFrame | ErrorFrame


class ClientError(Exception):
    """Base of every error this library raises."""


class DaemonUnavailable(ClientError):
    """No daemon could be reached at the socket path."""


class ConnectionLost(ClientError):
    """The daemon closed the connection; `error` is its last connection-level error frame, if any."""

    def __init__(self, message: str, error: ErrorFrame | None = None) -> None:
        super().__init__(message)
        self.error = error


class ProtocolError(ClientError):
    """The daemon sent something that is not SPEC section 2."""


class ClientTimeout(ClientError, TimeoutError):
    """No frame arrived within the client's timeout."""


class TooManyUnread(ClientError):
    """Frames piled up for streams nobody reads; consume them or use separate connections."""


class RequestFailed(ClientError):
    """A request ended with an `error` frame (raised by `complete()`)."""

    def __init__(self, error: ErrorFrame) -> None:
        super().__init__(f"{error.code}: {error.message}")
        self.code = error.code
        self.message = error.message
        self.id = error.id


class Completion(msgspec.Struct):
    """A whole generation, as `complete()` returns it."""

    id: str
    request_id: int
    token_ids: list[int]
    text: str
    finish_reason: str
    usage: Usage
    logprobs: list[TokenLogprob] | None = None


def client_socket_path(path: str | os.PathLike[str] | None = None) -> str:
    """Explicit path, else $OVERLAPD_SOCKET, else the system daemon's socket when
    it exists, else this user's default (SPEC 2.1)."""
    if path is not None:
        return os.fspath(path)
    env = os.environ.get("OVERLAPD_SOCKET")
    if env:
        return env
    if os.path.exists(SYSTEMD_SOCKET_PATH):
        return SYSTEMD_SOCKET_PATH
    return default_socket_path()


def explain_connect_error(path: str, exc: OSError) -> DaemonUnavailable:
    if isinstance(exc, FileNotFoundError):
        msg = (
            f"No overlapd socket at {path}; start the daemon (`overlapd serve`, or "
            "`systemctl start overlapd.socket`) or pass the right --socket."
        )
    elif isinstance(exc, ConnectionRefusedError):
        msg = f"Nothing listens on {path} (a stale socket file); start the daemon."
    elif isinstance(exc, PermissionError):
        msg = (
            f"Permission denied on {path}; join the socket's group (`overlapd` under systemd) "
            "or ask the operator for access."
        )
    elif isinstance(exc, TimeoutError):
        msg = f"The daemon at {path} did not accept the connection in time; it may be overloaded."
    else:
        msg = f"Cannot connect to {path}: {exc.strerror or exc}."
    return DaemonUnavailable(msg)


class IdAllocator:
    """Connection-unique request ids: 'r1', 'r2', ... unless the caller names one."""

    def __init__(self) -> None:
        self._n = itertools.count(1)

    def next(self, taken: Iterable[str]) -> str:
        taken_set = set(taken)
        while True:
            candidate = f"r{next(self._n)}"
            if candidate not in taken_set:
                return candidate


def build_generate(
    id: str,
    prompt: str | None,
    prompt_ids: list[int] | None,
    *,
    max_tokens: int,
    temperature: float,
    top_p: float,
    top_k: int,
    seed: int | None,
    stop: Iterable[str],
    stop_token_ids: Iterable[int],
    ignore_eos: bool,
    logprobs: int,
    speculative: bool = True,
) -> GenerateFrame:
    if (prompt is None) == (prompt_ids is None):
        raise ValueError("pass exactly one of prompt= or prompt_ids=")
    return GenerateFrame(
        id=id,
        prompt=prompt,
        prompt_ids=list(prompt_ids) if prompt_ids is not None else None,
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        seed=seed,
        stop=list(stop),
        stop_token_ids=list(stop_token_ids),
        ignore_eos=ignore_eos,
        logprobs=logprobs,
        speculative=speculative,
    )


def frame_id(frame: DaemonFrame) -> str | None:
    """The request a daemon frame belongs to, or None for health/stats/connection errors."""
    return getattr(frame, "id", None)


def is_terminal(frame: DaemonFrame) -> bool:
    return isinstance(frame, (DoneFrame, ErrorFrame))


class CompletionBuilder:
    """Folds a stream's events into a Completion."""

    def __init__(self, id: str) -> None:
        self.id = id
        self.request_id = -1
        self.token_ids: list[int] = []
        self.parts: list[str] = []
        self.logprobs: list[TokenLogprob] | None = None

    def add(self, event: Event) -> Completion | None:
        if isinstance(event, AcceptedFrame):
            self.request_id = event.request_id
        elif isinstance(event, TokensFrame):
            self.token_ids.extend(event.token_ids)
            self.parts.append(event.text)
            if event.logprobs is not None:
                self.logprobs = (self.logprobs or []) + event.logprobs
        elif isinstance(event, ErrorFrame):
            raise RequestFailed(event)
        elif isinstance(event, DoneFrame):
            return Completion(
                self.id, self.request_id, self.token_ids, "".join(self.parts), event.finish_reason, event.usage, self.logprobs
            )
        return None
