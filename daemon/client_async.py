"""asyncio client for the overlapd socket; `client.py` re-exports it.

    client = await AsyncClient.connect(path)
    async with client:
        async for event in client.generate("Hello", max_tokens=8):
            ...

One reader task per connection routes frames to their stream by id; health
and stats replies come back in the order they were asked for.
"""

from __future__ import annotations

import asyncio
import os
from collections import deque
from collections.abc import Iterable
from typing import Any

import msgspec

from .client_base import (
    CLIENT_MAX_FRAME_BYTES,
    DEFAULT_MAX_UNREAD_FRAMES,
    DEFAULT_TIMEOUT_S,
    ClientError,
    ClientTimeout,
    Completion,
    CompletionBuilder,
    ConnectionLost,
    Event,
    IdAllocator,
    ProtocolError,
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

_END = object()  # queued after a stream's terminal frame or on connection loss


class AsyncGenerateStream:
    """Async iterator over one request's events; ends after done or error."""

    def __init__(self, client: AsyncClient, id: str) -> None:
        self.id = id
        self.request_id: int | None = None
        self.finished = False
        self._client = client
        self._queue: asyncio.Queue[Any] = asyncio.Queue()  # bounded by the client's unread count

    def __aiter__(self) -> AsyncGenerateStream:
        return self

    async def __anext__(self) -> Event:
        if self.finished and self._queue.empty():
            raise StopAsyncIteration
        if not self._queue.empty():
            item = self._queue.get_nowait()  # no timer needed for what already arrived
        else:
            try:
                item = await asyncio.wait_for(self._queue.get(), self._client.timeout)
            except asyncio.TimeoutError:
                raise ClientTimeout(f"No frame for {self.id!r} within the timeout.") from None
        self._client._unread -= 1
        if item is _END:
            self.finished = True
            raise StopAsyncIteration
        if isinstance(item, ClientError):
            self.finished = True
            raise item
        return item

    async def abort(self) -> None:
        if not self.finished:
            await self._client.abort(self.id)

    async def complete(self) -> Completion:
        builder = CompletionBuilder(self.id)
        async for event in self:
            result = builder.add(event)
            if result is not None:
                return result
        raise ConnectionLost(f"The stream {self.id!r} ended without a done frame.")

    async def close(self) -> None:
        if not self.finished:
            self.finished = True
            await self._client._forget(self.id, abort=True)

    async def __aenter__(self) -> AsyncGenerateStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


class AsyncClient:
    """asyncio client for one connection to the daemon."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        path: str = "",
        timeout: float | None = DEFAULT_TIMEOUT_S,
        max_unread_frames: int = DEFAULT_MAX_UNREAD_FRAMES,
    ) -> None:
        self.path = path
        self.timeout = timeout
        self._reader = reader
        self._writer = writer
        self._streams: dict[str, AsyncGenerateStream] = {}
        self._waiters: deque[asyncio.Future[HealthFrame | StatsFrame]] = deque()
        self._ids = IdAllocator()
        self._unread = 0
        self._max_unread = max_unread_frames
        self._closed_by: ClientError | None = None
        self._last_error: ErrorFrame | None = None
        self._task = asyncio.get_running_loop().create_task(self._read_loop(), name="overlapd-client-reader")

    @classmethod
    async def connect(
        cls, path: str | os.PathLike[str] | None = None, *, timeout: float | None = DEFAULT_TIMEOUT_S, **kw: Any
    ) -> AsyncClient:
        target = client_socket_path(path)
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(target), timeout)
        except asyncio.TimeoutError:
            raise explain_connect_error(target, TimeoutError()) from None
        except OSError as exc:
            raise explain_connect_error(target, exc) from None
        return cls(reader, writer, path=target, timeout=timeout, **kw)

    # ------------------------------------------------------------ requests

    async def generate(
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
    ) -> AsyncGenerateStream:
        rid = id if id is not None else self._ids.next(self._streams)
        if rid in self._streams:
            raise ValueError(f"id {rid!r} is already live on this connection")
        frame = build_generate(
            rid, prompt, prompt_ids, max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
            seed=seed, stop=stop, stop_token_ids=stop_token_ids, ignore_eos=ignore_eos, logprobs=logprobs,
            speculative=speculative,
        )
        stream = AsyncGenerateStream(self, rid)
        self._streams[rid] = stream
        await self._send(frame)
        return stream

    async def complete(self, prompt: str | None = None, **kw: Any) -> Completion:
        stream = await self.generate(prompt, **kw)
        async with stream:
            return await stream.complete()

    async def abort(self, id: str) -> None:
        await self._send(AbortFrame(id))

    async def health(self) -> HealthFrame:
        reply = await self._ask(HealthQuery())
        if not isinstance(reply, HealthFrame):
            raise ProtocolError(f"expected a health frame, got {type(reply).__name__}")
        return reply

    async def stats(self) -> dict[str, int | float]:
        reply = await self._ask(StatsQuery())
        if not isinstance(reply, StatsFrame):
            raise ProtocolError(f"expected a stats frame, got {type(reply).__name__}")
        return reply.counters

    async def send_frame(self, frame: msgspec.Struct) -> None:
        await self._send(frame)

    async def close(self) -> None:
        if self._closed_by is None:
            self._fail(ConnectionLost("The client was closed."))
        self._task.cancel()
        self._writer.close()
        try:
            await self._writer.wait_closed()
        except (ConnectionError, OSError):
            pass

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # ------------------------------------------------------------ internals

    async def _ask(self, query: msgspec.Struct) -> HealthFrame | StatsFrame:
        fut: asyncio.Future[HealthFrame | StatsFrame] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        await self._send(query)
        try:
            return await asyncio.wait_for(asyncio.shield(fut), self.timeout)
        except asyncio.TimeoutError:
            raise ClientTimeout("No reply from the daemon within the timeout.") from None

    async def _send(self, frame: msgspec.Struct) -> None:
        if self._closed_by is not None:
            raise self._closed_by
        try:
            self._writer.write(encode_frame(frame))
            await asyncio.wait_for(self._writer.drain(), self.timeout)
        except asyncio.TimeoutError:
            raise ClientTimeout("The daemon did not take our frame in time.") from None
        except (ConnectionError, OSError) as exc:
            # The reader may still be taking in the daemon's last words (why it
            # closed); give it a moment so the exception can carry them.
            await asyncio.wait([self._task], timeout=0.5)
            self._fail(self._lost(f"The connection broke while sending: {exc}."))
            raise self._closed_by from None  # type: ignore[misc]

    async def _forget(self, id: str, *, abort: bool) -> None:
        stream = self._streams.pop(id, None)
        if stream is not None:
            while not stream._queue.empty():
                stream._queue.get_nowait()
                self._unread -= 1
        if abort and self._closed_by is None:
            try:
                await self._send(AbortFrame(id))
            except ClientError:
                pass

    async def _read_loop(self) -> None:
        decoder = FrameDecoder(CLIENT_MAX_FRAME_BYTES)
        try:
            while True:
                data = await self._reader.read(65536)
                if not data:
                    self._fail(self._lost("The daemon closed the connection."))
                    return
                for body in decoder.feed(data):
                    self._route(decode_daemon_frame(body))
                if decoder.error is not None:
                    raise ProtocolError(f"The daemon sent an oversized frame: {decoder.error}")
        except ProtocolViolation as exc:
            self._fail(ProtocolError(str(exc)))
        except ClientError as exc:
            self._fail(exc)
        except (ConnectionError, OSError) as exc:
            self._fail(self._lost(f"The connection broke: {exc}."))

    def _lost(self, message: str) -> ConnectionLost:
        if self._last_error is not None:
            message = f"{message} The daemon said: {self._last_error.code}: {self._last_error.message}"
        return ConnectionLost(message, self._last_error)

    def _fail(self, err: ClientError) -> None:
        if self._closed_by is not None:
            return
        self._closed_by = err
        for stream in self._streams.values():
            stream._queue.put_nowait(err)
            self._unread += 1
        self._streams.clear()
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_exception(err)

    def _route(self, frame: DaemonFrame) -> None:
        if isinstance(frame, (HealthFrame, StatsFrame)):
            if self._waiters:
                fut = self._waiters.popleft()
                if not fut.done():
                    fut.set_result(frame)
            return
        rid = frame_id(frame)
        if rid is None:
            assert isinstance(frame, ErrorFrame)
            self._last_error = frame  # connection-level; the daemon closes next
            return
        stream = self._streams.get(rid)
        if stream is None:
            return  # a stream we forgot (closed early); its frames are dropped
        if hasattr(frame, "request_id"):
            stream.request_id = frame.request_id  # type: ignore[union-attr]
        stream._queue.put_nowait(frame)
        self._unread += 1
        if is_terminal(frame):
            del self._streams[rid]
            stream._queue.put_nowait(_END)
            self._unread += 1
        if self._unread > self._max_unread:
            raise TooManyUnread(
                f"{self._unread} frames wait unread across this connection's streams; read them, or close() the "
                "streams you no longer want."
            )
