"""The asyncio unix-socket server of SPEC section 2, over any `Engine`.

Lifecycle:

    server = SocketServer(engine, config)           # or listen_sock=<systemd socket>
    await server.start()
    ...                                             # SIGTERM:
    await server.drain(config.drain_timeout_s)      # refuse new work, let in-flight finish
    await server.close()                            # end the rest with an error frame each

Guarantees: every accepted request ends with exactly one `done` or `error`
frame (the engine's first terminal call wins; close() ends the remainder
itself); a connection that closes aborts its live requests; a malformed frame
gets an `error` frame and never takes the server down; live requests are
capped per connection and in total; a client that stops reading is cut off
once `write_buffer_cap` bytes are queued for it (connection.py).
"""

from __future__ import annotations

import asyncio
import itertools
import socket
import time
from typing import Any

import msgspec
import structlog

from .config import ServerConfig
from .connection import Connection, RequestStream
from .engine_api import Engine, EngineError, params_from_frame
from .protocol import (
    AbortFrame,
    ClientFrame,
    ErrorFrame,
    GenerateFrame,
    HealthFrame,
    HealthQuery,
    StatsFrame,
    StatsQuery,
)
from .socket_setup import (
    BoundSocket,
    SocketSetupError,
    bind_unix_socket,
    peer_credentials,
)

__all__ = ["ServerCounters", "SocketServer"]

CLOSE_WAIT_S = 2.0  # how long close() waits for connection tasks to wind down


class ServerCounters(msgspec.Struct):
    connections: int = 0
    connections_total: int = 0
    connections_refused: int = 0
    frames_in: int = 0
    frames_out: int = 0
    errors: int = 0
    requests_accepted: int = 0
    requests_rejected: int = 0
    disconnect_aborts: int = 0
    slow_client_disconnects: int = 0


class SocketServer:
    """Serves one Engine on a unix stream socket."""

    def __init__(
        self,
        engine: Engine,
        config: ServerConfig | None = None,
        *,
        listen_sock: socket.socket | None = None,
        logger: Any = None,
    ) -> None:
        self.engine = engine
        self.config = config or ServerConfig()
        self.counters = ServerCounters()
        self._listen_sock = listen_sock  # inherited (systemd): not ours to chmod or unlink
        self._bound: BoundSocket | None = None
        self._server: asyncio.AbstractServer | None = None
        self._conns: set[Connection] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._live: set[RequestStream] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._numbers = itertools.count(1)
        self._draining = False
        self._closed = False
        self._started_at = time.monotonic()
        self._log = logger or structlog.get_logger("overlapd.server")

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Listen. Raises SocketSetupError / SocketInUse when the path is unusable."""
        if self._server is not None:
            raise RuntimeError("SocketServer already started")
        sock = self._listen_sock
        if sock is None:
            self._bound = bind_unix_socket(
                self.config.socket_path, mode=self.config.mode, group=self.config.socket_group
            )
            sock = self._bound.sock
        elif sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
            raise SocketSetupError("The inherited socket is not an AF_UNIX stream socket; fix ListenStream= in the .socket unit.")
        try:
            self._server = await asyncio.start_unix_server(self._on_client, sock=sock, backlog=socket.SOMAXCONN)
        except BaseException:
            if self._bound is not None:
                self._bound.release()
                self._bound = None
            raise
        self._started_at = time.monotonic()
        self._log.info("server_listening", address=self.address, inherited=self._listen_sock is not None)

    @property
    def address(self) -> str:
        if self._bound is not None:
            return self._bound.path
        if self._listen_sock is not None:
            name = self._listen_sock.getsockname()
            return name if isinstance(name, str) else repr(name)
        return self.config.socket_path

    @property
    def draining(self) -> bool:
        return self._draining or bool(self.engine.draining)

    @property
    def live_requests(self) -> int:
        return len(self._live)

    def begin_drain(self) -> None:
        """From now on `generate` is answered `shutting_down`; in-flight requests go on."""
        if not self._draining:
            self._draining = True
            self._log.info("server_draining", live=len(self._live))

    async def wait_idle(self, timeout: float | None = None) -> bool:
        """True once no accepted request is live; False if `timeout` passed first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    def abort_all(self) -> int:
        """Ask the engine to abort every live request; each still ends with a frame."""
        count = 0
        for stream in list(self._live):
            if stream.request_id is not None:
                self._abort_in_engine(stream.request_id)
                count += 1
        return count

    async def drain(self, timeout: float | None = None, abort_grace_s: float = 2.0) -> bool:
        """begin_drain, then wait up to `timeout` for in-flight requests to finish;
        past it, abort them and give the engine `abort_grace_s` to report.
        True when everything finished without being aborted."""
        self.begin_drain()
        if await self.wait_idle(self.config.drain_timeout_s if timeout is None else timeout):
            return True
        self._log.warning("drain_timeout_aborting", live=len(self._live))
        self.abort_all()
        await self.wait_idle(abort_grace_s)
        return False

    async def close(self) -> None:
        """Stop listening, end every live request with one frame, close every
        connection and remove the socket file if this server created it."""
        if self._closed:
            return
        self._closed = True
        self.begin_drain()
        if self._server is not None:
            self._server.close()
        for stream in list(self._live):
            if stream.request_id is not None:
                self._abort_in_engine(stream.request_id)
            stream.force_end(
                "shutting_down", "The daemon stopped before this request finished; send it again once the daemon is back."
            )
        for conn in list(self._conns):
            conn.close()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=CLOSE_WAIT_S)
        if self._bound is not None:
            self._bound.release()
            self._bound = None
        elif self._listen_sock is not None:
            self._listen_sock.close()  # systemd keeps its own copy and the file
        self._log.info("server_closed")

    async def __aenter__(self) -> SocketServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # ------------------------------------------------------------ reports

    def health(self) -> HealthFrame:
        return HealthFrame(
            status="draining" if self.draining else "ok",
            model=str(self.engine.model_name),
            uptime_s=round(time.monotonic() - self._started_at, 3),
        )

    def stats(self) -> dict[str, int | float]:
        # The engine may report its own live_requests / uptime_s; ours are the fallback.
        merged: dict[str, int | float] = {
            "live_requests": len(self._live),
            "uptime_s": round(time.monotonic() - self._started_at, 3),
        }
        try:
            merged.update((k, v) for k, v in self.engine.stats().items() if isinstance(v, (int, float)))
        except Exception:  # noqa: BLE001 - a broken stats() must not break the connection
            self._log.exception("engine_stats_failed")
        merged.update(msgspec.structs.asdict(self.counters))
        merged["server_live_requests"] = len(self._live)
        return merged

    # ------------------------------------------------------------ connections

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        conn = Connection(
            reader,
            writer,
            number=next(self._numbers),
            max_frame_bytes=self.config.max_frame_bytes,
            write_buffer_cap=self.config.write_buffer_cap,
            counters=self.counters,
            on_frame=self._on_frame,
            on_lost_requests=self._on_lost_requests,
        )
        try:
            refusal = self._refusal(writer)
            if refusal is not None:
                self.counters.connections_refused += 1
                conn.send_and_close(refusal)
                return
            self.counters.connections_total += 1
            self.counters.connections += 1
            self._conns.add(conn)
            try:
                await conn.serve()
            finally:
                self._conns.discard(conn)
                self.counters.connections -= 1
        finally:
            if task is not None:
                self._tasks.discard(task)

    def _refusal(self, writer: asyncio.StreamWriter) -> ErrorFrame | None:
        if self._closed:
            return ErrorFrame(code="shutting_down", message="The daemon is shutting down; connect again once it is back.")
        if len(self._conns) >= self.config.max_connections:
            return ErrorFrame(
                code="overloaded",
                message=f"The daemon already serves {len(self._conns)} connections ([server] max_connections); "
                "retry shortly or reuse a connection.",
            )
        allowed = self.config.allowed_uids
        if allowed is not None:
            creds = peer_credentials(writer.get_extra_info("socket"))
            if creds is None or creds.uid not in allowed:
                uid = "unknown" if creds is None else str(creds.uid)
                self._log.warning("connection_refused_uid", uid=uid)
                # SPEC 2.3 has no permission code; invalid_request is the closest.
                return ErrorFrame(
                    code="invalid_request",
                    message=f"uid {uid} may not use this daemon; ask its operator to add it to [server] allowed_uids.",
                )
        return None

    def _on_lost_requests(self, streams: list[RequestStream]) -> None:
        for stream in streams:
            if not stream.ended and stream.request_id is not None:
                self.counters.disconnect_aborts += 1
                self._abort_in_engine(stream.request_id)

    # ------------------------------------------------------------ frames

    def _on_frame(self, conn: Connection, frame: ClientFrame | ErrorFrame) -> None:
        if isinstance(frame, GenerateFrame):
            self._generate(conn, frame)
        elif isinstance(frame, AbortFrame):
            stream = conn.live.get(frame.id)
            # Unknown ids are ignored: the request may have just ended, and an
            # error frame carrying its id would look like a second end.
            if stream is not None and stream.request_id is not None:
                self._abort_in_engine(stream.request_id)
        elif isinstance(frame, HealthQuery):
            conn.send(self.health())
        elif isinstance(frame, StatsQuery):
            conn.send(StatsFrame(self.stats()))
        elif isinstance(frame, ErrorFrame):
            if frame.code == "too_large":
                conn.send_and_close(frame)
            else:
                conn.send(frame)

    def _generate(self, conn: Connection, frame: GenerateFrame) -> None:
        refusal = self._admission(conn, frame.id)
        if refusal is not None:
            self.counters.requests_rejected += 1
            conn.send(ErrorFrame(id=frame.id, code=refusal[0], message=refusal[1]))
            return
        stream = RequestStream(conn, frame.id, self._on_request_end)
        conn.live[frame.id] = stream
        self._live.add(stream)
        self._idle.clear()
        try:
            request_id = self.engine.submit(params_from_frame(frame), stream)
        except EngineError as exc:
            self.counters.requests_rejected += 1
            conn.live.pop(frame.id, None)
            stream.reject(exc.code, exc.message)
            return
        except Exception:  # noqa: BLE001 - an engine bug must cost one request, not the daemon
            self._log.exception("engine_submit_failed", id=frame.id)
            self.counters.requests_rejected += 1
            conn.live.pop(frame.id, None)
            stream.reject("internal", "The engine failed while admitting this request; the daemon log has the details.")
            return
        self.counters.requests_accepted += 1
        stream.accepted(request_id)

    def _admission(self, conn: Connection, client_id: str) -> tuple[str, str] | None:
        if client_id in conn.live:
            return (
                "invalid_request",
                f"`id` {client_id!r} is already used by a live request on this connection; "
                "use an id that is unique among your live requests.",
            )
        if self.draining:
            return ("shutting_down", "The daemon is draining for shutdown and takes no new requests; retry once it is back.")
        limit = self.config.max_live_per_connection
        if len(conn.live) >= limit:
            return (
                "overloaded",
                f"This connection already has {limit} live requests ([server] max_live_per_connection); "
                "wait for one to end or open another connection.",
            )
        if len(self._live) >= self.config.max_live_total:
            return (
                "overloaded",
                f"The daemon has {len(self._live)} live requests, its limit ([server] max_live_total); retry shortly.",
            )
        return None

    def _on_request_end(self, stream: RequestStream) -> None:
        self._live.discard(stream)
        if not self._live:
            self._idle.set()

    def _abort_in_engine(self, request_id: int) -> None:
        try:
            self.engine.abort(request_id)
        except Exception:  # noqa: BLE001
            self._log.exception("engine_abort_failed", request_id=request_id)
