"""Python client for the overlapd socket (SPEC section 2): `Client` (blocking)
and `AsyncClient` (asyncio, from client_async.py).

    with Client.connect() as c:
        for event in c.generate("Hello", max_tokens=8):
            ...                       # AcceptedFrame, TokensFrame..., DoneFrame | ErrorFrame
        print(c.complete("Hello").text, c.health().status)

Several generations may be in flight on one connection; frames are routed to
their stream by id. A Client is not thread-safe: use one per thread.
"""

from __future__ import annotations

import os
import socket
import weakref
from collections import deque
from collections.abc import Iterable
from typing import Any

import msgspec

from .client_async import AsyncClient, AsyncGenerateStream
from .client_base import (
    CLIENT_MAX_FRAME_BYTES,
    DEFAULT_MAX_UNREAD_FRAMES,
    DEFAULT_TIMEOUT_S,
    ClientError,
    ClientTimeout,
    Completion,
    CompletionBuilder,
    ConnectionLost,
    DaemonUnavailable,
    Event,
    IdAllocator,
    ProtocolError,
    RequestFailed,
    TooManyUnread,
    build_generate,
    client_socket_path,
    explain_connect_error,
    frame_id,
    is_terminal,
)
from .protocol import (
    AbortFrame,
    DaemonFrame,
    ErrorFrame,
    FrameDecoder,
    HealthFrame,
    HealthQuery,
    ProtocolViolation,
    StatsFrame,
    StatsQuery,
    decode_daemon_frame,
    encode_frame,
)

__all__ = [
    "AsyncClient",
    "AsyncGenerateStream",
    "Client",
    "ClientError",
    "ClientTimeout",
    "Completion",
    "ConnectionLost",
    "DaemonUnavailable",
    "GenerateStream",
    "ProtocolError",
    "RequestFailed",
    "TooManyUnread",
]


def _connect(path: str, timeout: float | None) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
    except OSError as exc:
        sock.close()
        raise explain_connect_error(path, exc) from None
    return sock


class GenerateStream:
    """Iterator over one request's events; ends after its done or error frame.

    Use it as a context manager (or call close()) to abort a generation you
    stop reading early; a stream that is garbage-collected unfinished is
    aborted on the next read from the connection.
    """

    def __init__(self, client: Client, id: str) -> None:
        self.id = id
        self.request_id: int | None = None
        self.finished = False
        self._client = client
        self._queue: deque[Event] = deque()

    def __iter__(self) -> GenerateStream:
        return self

    def __next__(self) -> Event:
        if self.finished and not self._queue:
            raise StopIteration
        while not self._queue:
            self._client._pump()
        event = self._queue.popleft()
        self._client._unread -= 1
        return event

    def abort(self) -> None:
        """Ask the daemon to stop; the stream still ends with its done('aborted') frame."""
        if not self.finished:
            self._client.abort(self.id)

    def complete(self) -> Completion:
        """Read to the end; raise RequestFailed on an error frame."""
        builder = CompletionBuilder(self.id)
        for event in self:
            result = builder.add(event)
            if result is not None:
                return result
        raise ConnectionLost(f"The stream {self.id!r} ended without a done frame.")

    def close(self) -> None:
        """Abort if unfinished and stop delivering this stream's frames."""
        if not self.finished:
            self._client._forget(self.id, abort=True)
            self.finished = True
        self._client._unread -= len(self._queue)
        self._queue.clear()

    def __enter__(self) -> GenerateStream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class Client:
    """Blocking client for one connection to the daemon."""

    def __init__(
        self,
        target: str | os.PathLike[str] | socket.socket | None = None,
        *,
        timeout: float | None = DEFAULT_TIMEOUT_S,
        max_unread_frames: int = DEFAULT_MAX_UNREAD_FRAMES,
    ) -> None:
        """Connect to `target` (a socket path, default as client_socket_path()
        says), or adopt an already connected socket."""
        if isinstance(target, socket.socket):
            sock, self.path = target, ""
        else:
            self.path = client_socket_path(target)
            sock = _connect(self.path, timeout)
        self._sock = sock
        self._sock.settimeout(timeout)
        self._decoder = FrameDecoder(CLIENT_MAX_FRAME_BYTES)
        self._streams: dict[str, weakref.ref[GenerateStream]] = {}
        self._replies: deque[HealthFrame | StatsFrame] = deque()
        self._ids = IdAllocator()
        self._unread = 0
        self._max_unread = max_unread_frames
        self._closed_by: ClientError | None = None
        self._last_error: ErrorFrame | None = None

    @classmethod
    def connect(cls, path: str | os.PathLike[str] | None = None, *, timeout: float | None = DEFAULT_TIMEOUT_S, **kw: Any) -> Client:
        """Same as Client(path, ...)."""
        return cls(path, timeout=timeout, **kw)

    # ------------------------------------------------------------ requests

    def generate(
        self,
        prompt: str | None = None,
        *,
        prompt_ids: list[int] | None = None,
        max_tokens: int = 16,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        stop: Iterable[str] = (),
        stop_token_ids: Iterable[int] = (),
        ignore_eos: bool = False,
        logprobs: int = 0,
        speculative: bool = True,
        id: str | None = None,
    ) -> GenerateStream:
        """Send a generate frame; iterate the returned stream for its events."""
        rid = id if id is not None else self._ids.next(self._streams)
        if rid in self._streams:
            raise ValueError(f"id {rid!r} is already live on this connection")
        frame = build_generate(
            rid, prompt, prompt_ids, max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
            seed=seed, stop=stop, stop_token_ids=stop_token_ids, ignore_eos=ignore_eos, logprobs=logprobs,
            speculative=speculative,
        )
        stream = GenerateStream(self, rid)
        self._streams[rid] = weakref.ref(stream)
        self._send(frame)
        return stream

    def complete(self, prompt: str | None = None, **kw: Any) -> Completion:
        """generate() and read to the end; raises RequestFailed on an error frame."""
        with self.generate(prompt, **kw) as stream:
            return stream.complete()

    def abort(self, id: str) -> None:
        self._send(AbortFrame(id))

    def health(self) -> HealthFrame:
        reply = self._ask(HealthQuery())
        if not isinstance(reply, HealthFrame):
            raise ProtocolError(f"expected a health frame, got {type(reply).__name__}")
        return reply

    def stats(self) -> dict[str, int | float]:
        reply = self._ask(StatsQuery())
        if not isinstance(reply, StatsFrame):
            raise ProtocolError(f"expected a stats frame, got {type(reply).__name__}")
        return reply.counters

    def send_frame(self, frame: msgspec.Struct) -> None:
        """Send any protocol frame as is (tools and tests)."""
        self._send(frame)

    def close(self) -> None:
        self._closed_by = self._closed_by or ConnectionLost("The client was closed.")
        self._sock.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ------------------------------------------------------------ internals

    def _ask(self, query: msgspec.Struct) -> HealthFrame | StatsFrame:
        self._send(query)
        while not self._replies:
            self._pump()
        return self._replies.popleft()

    def _send(self, frame: msgspec.Struct) -> None:
        if self._closed_by is not None:
            raise self._closed_by
        try:
            self._sock.sendall(encode_frame(frame))
        except TimeoutError:
            raise ClientTimeout("The daemon did not take our frame in time.") from None
        except OSError as exc:
            self._salvage()
            raise self._lost(f"The connection broke while sending: {exc.strerror or exc}.") from None

    def _salvage(self) -> None:
        """After a failed send, read what the daemon said before closing (e.g.
        why it refused us), so the exception can tell the caller."""
        self._sock.settimeout(0.5)
        try:
            while True:
                data = self._sock.recv(65536)
                if not data:
                    return
                for body in self._decoder.feed(data):
                    frame = decode_daemon_frame(body)
                    if isinstance(frame, ErrorFrame) and frame.id is None:
                        self._last_error = frame
        except (OSError, ProtocolViolation):
            return

    def _lost(self, message: str) -> ConnectionLost:
        if self._last_error is not None:
            message = f"{message} The daemon said: {self._last_error.code}: {self._last_error.message}"
        err = ConnectionLost(message, self._last_error)
        self._closed_by = err
        return err

    def _pump(self) -> None:
        """Read at least one chunk from the socket and route its frames."""
        if self._closed_by is not None:
            raise self._closed_by
        try:
            data = self._sock.recv(65536)
        except TimeoutError:
            raise ClientTimeout("No frame from the daemon within the timeout.") from None
        except OSError as exc:
            raise self._lost(f"The connection broke: {exc.strerror or exc}.") from None
        if not data:
            raise self._lost("The daemon closed the connection.")
        bodies = self._decoder.feed(data)
        for body in bodies:
            try:
                self._route(decode_daemon_frame(body))
            except ProtocolViolation as exc:
                raise ProtocolError(str(exc)) from None
        if self._decoder.error is not None:
            raise ProtocolError(f"The daemon sent an oversized frame: {self._decoder.error}")

    def _route(self, frame: DaemonFrame) -> None:
        if isinstance(frame, (HealthFrame, StatsFrame)):
            self._replies.append(frame)
            return
        rid = frame_id(frame)
        if rid is None:
            # A connection-level error (refused peer, too_large, ...): the
            # daemon closes next; remember why for the ConnectionLost.
            assert isinstance(frame, ErrorFrame)
            self._last_error = frame
            return
        ref = self._streams.get(rid)
        stream = ref() if ref is not None else None
        if stream is None:
            if ref is not None and not is_terminal(frame):
                self._forget(rid, abort=True)  # its reader dropped it unfinished
            return
        if is_terminal(frame):
            stream.finished = True
            del self._streams[rid]
        elif hasattr(frame, "request_id"):
            stream.request_id = frame.request_id  # type: ignore[union-attr]
        stream._queue.append(frame)  # type: ignore[arg-type]
        self._unread += 1
        if self._unread > self._max_unread:
            raise TooManyUnread(
                f"{self._unread} frames wait unread across this connection's streams; read them, or close() the "
                "streams you no longer want."
            )

    def _forget(self, id: str, *, abort: bool) -> None:
        self._streams.pop(id, None)
        if abort and self._closed_by is None:
            try:
                self._send(AbortFrame(id))
            except ClientError:
                pass
