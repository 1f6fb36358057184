"""One client connection: its reader task, its outgoing frames, its live requests.

Slow readers: frames for a client are written without waiting (the emit stage
serves every client from one loop and must never block on one of them). When
a client falls more than `write_buffer_cap` bytes behind, we abort its
requests and drop the connection (transport.abort, discarding the backlog).
Before that point, the reader task stops reading new frames from a client
whose replies pile up past half the cap, so a client that only writes cannot
make us queue answers for it without bound.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

import msgspec
import structlog

from .engine_api import ENGINE_ERROR_CODES, TokenLogprob
from .protocol import (
    FINISH_REASONS,
    AcceptedFrame,
    ClientFrame,
    DoneFrame,
    ErrorFrame,
    RequestDecoder,
    TokensFrame,
    Usage,
    encode_frame,
)

if TYPE_CHECKING:
    from .server import ServerCounters

READ_CHUNK: Final = 64 * 1024
# After close(), a peer that never reads would keep its backlog alive; past
# this grace the transport is aborted instead.
CLOSE_GRACE_S: Final = 5.0

log = structlog.get_logger("overlapd.connection")


class RequestStream:
    """The server's RequestSink for one accepted request.

    Ends exactly once: the first of on_done / on_error / force_end wins and
    later calls are ignored. Frames reported before `accepted` is sent are
    held, so the wire order is always accepted, tokens..., end.
    """

    __slots__ = ("conn", "client_id", "request_id", "ended", "_pending", "_on_end")

    def __init__(self, conn: Connection, client_id: str, on_end: Callable[[RequestStream], None]) -> None:
        self.conn: Connection | None = conn
        self.client_id = client_id
        self.request_id: int | None = None
        self.ended = False
        self._pending: list[msgspec.Struct] | None = []
        self._on_end = on_end

    # -- RequestSink: called by the pipeline's emit stage; never raise into it.
    def on_tokens(self, token_ids: list[int], text: str, logprobs: list[TokenLogprob] | None) -> None:
        if self.ended:
            return
        try:
            self._emit(TokensFrame(self.client_id, list(token_ids), text, logprobs))
        except Exception:  # noqa: BLE001
            log.exception("sink_on_tokens_failed", request_id=self.request_id)

    def on_done(self, finish_reason: str, prompt_tokens: int, completion_tokens: int) -> None:
        if self.ended:
            return
        if finish_reason not in FINISH_REASONS:
            log.error("engine_bad_finish_reason", finish_reason=finish_reason, request_id=self.request_id)
            finish_reason = "error"
        try:
            self._end(DoneFrame(self.client_id, finish_reason, Usage(prompt_tokens, completion_tokens)))
        except Exception:  # noqa: BLE001
            log.exception("sink_on_done_failed", request_id=self.request_id)

    def on_error(self, code: str, message: str) -> None:
        if self.ended:
            return
        if code not in ENGINE_ERROR_CODES:
            log.error("engine_bad_error_code", code=code, request_id=self.request_id)
            code = "internal"
        try:
            self._end(ErrorFrame(id=self.client_id, code=code, message=str(message)))
        except Exception:  # noqa: BLE001
            log.exception("sink_on_error_failed", request_id=self.request_id)

    # -- server side
    def accepted(self, request_id: int) -> None:
        self.request_id = request_id
        pending, self._pending = self._pending or [], None
        if self.conn is not None:
            self.conn.send(AcceptedFrame(self.client_id, request_id))
            for frame in pending:
                self.conn.send(frame)

    def reject(self, code: str, message: str) -> None:
        """submit() refused: the client gets one error and never an accepted."""
        self._pending = None
        if self.conn is not None:
            self.conn.send(ErrorFrame(id=self.client_id, code=code, message=message))
        if not self.ended:
            self.ended = True
            self._on_end(self)

    def force_end(self, code: str, message: str) -> None:
        """The server ends the request itself (daemon closing)."""
        if not self.ended:
            self._end(ErrorFrame(id=self.client_id, code=code, message=message))

    def detach(self) -> None:
        """The client is gone: keep the bookkeeping, drop the frames."""
        self.conn = None

    def _emit(self, frame: msgspec.Struct) -> None:
        if self._pending is not None:
            self._pending.append(frame)
        elif self.conn is not None:
            self.conn.send(frame)

    def _end(self, frame: msgspec.Struct) -> None:
        self.ended = True
        try:
            self._emit(frame)
        finally:
            if self.conn is not None:
                self.conn.live.pop(self.client_id, None)
            self._on_end(self)


FrameHandler = Callable[["Connection", "ClientFrame | ErrorFrame"], None]
AbortHandler = Callable[[list[RequestStream]], None]


class Connection:
    """Reads frames from one client and writes frames to it."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        number: int,
        max_frame_bytes: int,
        write_buffer_cap: int,
        counters: ServerCounters,
        on_frame: FrameHandler,
        on_lost_requests: AbortHandler,
    ) -> None:
        self.number = number
        self.live: dict[str, RequestStream] = {}
        self._reader = reader
        self._writer = writer
        self._transport = writer.transport
        self._decoder = RequestDecoder(max_frame_bytes)
        self._cap = write_buffer_cap
        self._counters = counters
        self._on_frame = on_frame
        self._on_lost_requests = on_lost_requests
        self.closing = False
        # drain() returns only once the backlog is under the low mark.
        self._transport.set_write_buffer_limits(high=max(write_buffer_cap // 2, 1))

    def send(self, frame: msgspec.Struct) -> None:
        """Queue a frame for the client. Never raises: it runs inside the
        pipeline's emit stage, which one broken client must not stop."""
        if self.closing:
            return
        if self._transport.is_closing():
            # The peer went away and the reader task has not noticed yet;
            # uvloop would raise on write.
            self._close_soon(hard=True)
            return
        try:
            self._writer.write(encode_frame(frame))
        except (RuntimeError, OSError):
            self._close_soon(hard=True)
            return
        self._counters.frames_out += 1
        if isinstance(frame, ErrorFrame):
            self._counters.errors += 1
        if self._transport.get_write_buffer_size() > self._cap:
            self._counters.slow_client_disconnects += 1
            log.warning("slow_client_disconnected", connection=self.number, live=len(self.live), cap=self._cap)
            self._close_soon(hard=True)

    def _close_soon(self, *, hard: bool) -> None:
        self.closing = True
        # Not now: we may be inside the emit stage's loop over requests, and
        # aborting them would change what it iterates over.
        asyncio.get_running_loop().call_soon(self.close, hard)

    def send_and_close(self, frame: msgspec.Struct) -> None:
        self.send(frame)
        self.close()

    async def serve(self) -> None:
        """The connection's reader task: until EOF, a fatal frame, or close()."""
        try:
            while not self.closing:
                data = await self._reader.read(READ_CHUNK)
                if not data:
                    break
                for frame in self._decoder.feed(data):
                    self._counters.frames_in += 1
                    if self.closing:
                        break
                    self._on_frame(self, frame)
                if self._decoder.closed:
                    break  # too_large was answered; the stream cannot be re-synchronized
                await self._writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            self.close()

    def close(self, hard: bool = False) -> None:
        """Abort this client's live requests and close; idempotent."""
        self.closing = True
        if self.live:
            lost = list(self.live.values())
            self.live.clear()
            for stream in lost:
                stream.detach()
            self._on_lost_requests(lost)
        if self._transport.is_closing():
            if hard:
                self._transport.abort()
            return
        if hard:
            self._transport.abort()
            return
        self._transport.close()  # flushes what is queued, e.g. the final error frame
        asyncio.get_running_loop().call_later(CLOSE_GRACE_S, self._transport.abort)
