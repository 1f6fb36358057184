"""The OpenAI-compatible HTTP API, served by aiohttp on the daemon's own event loop.

    http = HttpServer(engine, config, stats=socket_server.stats)   # or listen_sock=<systemd socket>
    await http.start()
    ...
    await http.drain(timeout)    # SIGTERM: 503 for new requests, live ones finish or are aborted
    await http.close()

aiohttp's server rather than uvicorn + starlette: it runs as an AppRunner
inside an event loop that already exists (ours, uvloop), with no server
process or loop of its own to manage, and streams through StreamResponse
without a framework layer between the handler and the transport. The handler
of a client that disconnects is cancelled (handler_cancellation), which is
what aborts its request in the engine.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Final

import msgspec
import structlog
from aiohttp import web

from ..engine_api import Engine
from .config import ApiKeys, HttpConfig, parse_listen
from .errors import ApiError
from .handlers import GenerationApi
from .listener import bind_tcp, limited_factory
from .metrics import CONTENT_TYPE, HttpMetrics
from .schemas import Health, ModelCard, ModelList

__all__ = ["HttpServer"]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
ABORT_GRACE_S: Final = 2.0
BACKLOG: Final = 1024
_json = msgspec.json.Encoder()


def _error_response(exc: ApiError) -> web.Response:
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    return web.Response(status=exc.status, body=exc.body(), content_type="application/json", headers=headers)


class HttpServer:
    def __init__(
        self,
        engine: Engine,
        config: HttpConfig,
        *,
        stats: Callable[[], dict[str, int | float]],
        listen_sock: socket.socket | None = None,
    ) -> None:
        self.engine = engine
        self.config = config
        self._listen_sock = listen_sock
        # Read now: a missing or unsafe key file stops the daemon at start, not at the first request.
        self._keys = ApiKeys.from_file(config.api_key_file) if config.api_key_file else None
        self.metrics = HttpMetrics(stats, live=lambda: len(self.api.live), connections=self._connections)
        self.api = GenerationApi(engine, config, self.metrics, self._refusal)
        self._draining = False
        self._started = time.time()
        self._runner: web.AppRunner | None = None
        self._listener: asyncio.AbstractServer | None = None
        self.address = ""
        self._log = structlog.get_logger("overlapd.http")
        app = web.Application(client_max_size=config.max_body_bytes, middlewares=[self._errors, self._auth])
        app.router.add_post("/v1/completions", self.api.completions)
        app.router.add_post("/v1/chat/completions", self.api.chat)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/health", self._health)
        app.router.add_get("/metrics", self._metrics)
        self.app = app

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        runner = web.AppRunner(self.app, handler_cancellation=True, access_log=None,
                               shutdown_timeout=ABORT_GRACE_S)
        await runner.setup()
        sock = self._listen_sock
        try:
            if sock is not None:
                if sock.family not in (socket.AF_INET, socket.AF_INET6):
                    raise ValueError("The inherited `http` socket is not a TCP socket; fix ListenStream= in overlapd-http.socket.")
            else:
                if self.config.listen is None:
                    raise ValueError("The HTTP API has no address; pass --http HOST:PORT or set [http] listen.")
                sock = bind_tcp(*parse_listen(self.config.listen), backlog=BACKLOG)
            assert runner.server is not None
            factory = limited_factory(runner.server, self.config.max_connections)
            self._listener = await asyncio.get_running_loop().create_server(factory, sock=sock, backlog=BACKLOG)
        except BaseException:
            if sock is not None and sock is not self._listen_sock:
                sock.close()
            await runner.cleanup()
            raise
        self._runner = runner
        host, port = sock.getsockname()[:2]
        self.address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self._log.info("http_listening", address=self.address, inherited=self._listen_sock is not None,
                       api_keys=self._keys is not None)

    @property
    def draining(self) -> bool:
        return self._draining or bool(self.engine.draining)

    def _connections(self) -> int:
        server = self._runner.server if self._runner is not None else None
        return len(server.connections) if server is not None else 0

    @property
    def live_requests(self) -> int:
        return len(self.api.live)

    def begin_drain(self) -> None:
        self._draining = True

    async def drain(self, timeout: float) -> bool:
        """Refuse new requests (503), wait up to `timeout` for live ones, then
        abort the rest. True when every one finished without being aborted."""
        self.begin_drain()
        if await self._wait_idle(timeout):
            return True
        self._log.warning("http_drain_timeout_aborting", live=len(self.api.live))
        self.api.abort_all()
        await self._wait_idle(ABORT_GRACE_S)
        return False

    async def _wait_idle(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.api.live:
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.02)
        return True

    async def close(self) -> None:
        self.begin_drain()
        if self._listener is not None:
            self._listener.close()  # no new connections; an inherited socket's file stays systemd's
            self._listener = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        self._log.info("http_closed")

    # ------------------------------------------------------------ middlewares

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except ApiError as exc:
            return _error_response(exc)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            return _error_response(ApiError(exc.status, f"{exc.reason}: {request.method} {request.path}.",
                                            code=exc.reason.lower().replace(" ", "_"), param=None))
        except (asyncio.CancelledError, ConnectionError):
            raise
        except Exception:  # noqa: BLE001 - one bad request must not reach the client as a stack trace
            self._log.exception("http_handler_failed", path=request.path)
            return _error_response(ApiError(500, "The server failed on this request; the daemon log has the details.",
                                            code="internal", param=None))

    @web.middleware
    async def _auth(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        # /health and /metrics stay open for probes and scrapers; the API itself needs a key.
        if self._keys is not None and request.path.startswith("/v1/"):
            if not self._keys.allows(request.headers.get("Authorization")):
                raise ApiError(401, "A valid API key is required: send `Authorization: Bearer <key>`.",
                               code="invalid_api_key", param=None)
        return await handler(request)

    def _refusal(self) -> ApiError | None:
        if self.draining:
            return ApiError(503, "The daemon is draining for shutdown and takes no new requests; retry once it is back.",
                            code="shutting_down", param=None)
        if len(self.api.live) >= self.config.max_live:
            return ApiError(429, f"{self.config.max_live} HTTP requests are already generating ([http] max_live); "
                            "retry shortly.", code="overloaded", param=None)
        return None

    # ------------------------------------------------------------ small endpoints

    async def _models(self, request: web.Request) -> web.Response:
        card = ModelCard(str(self.engine.model_name), int(self._started))
        return web.Response(body=_json.encode(ModelList([card])), content_type="application/json")

    async def _health(self, request: web.Request) -> web.Response:
        status = "draining" if self.draining else "ok"
        body = Health(status, str(self.engine.model_name), round(time.time() - self._started, 3))
        return web.Response(status=503 if self.draining else 200, body=_json.encode(body), content_type="application/json")

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.render(), headers={"Content-Type": CONTENT_TYPE})
