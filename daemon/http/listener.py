"""The HTTP API's listening socket and its connection limit.

aiohttp bounds neither the number of connections nor the idle ones kept
alive, so we hand the event loop our own protocol factory: past
`max_connections` a new connection gets one complete `429` response
(OpenAI-shaped JSON, `Connection: close`) and is closed, as the socket server
refuses with an `overloaded` frame.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable

from aiohttp import web

from .errors import ApiError


def bind_tcp(host: str, port: int, backlog: int) -> socket.socket:
    """A listening TCP socket on the first address `host` resolves to."""
    try:
        family, _, _, _, sockaddr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as exc:
        raise ValueError(f"Cannot resolve the HTTP address {host!r}: {exc.strerror}.") from None
    try:
        return socket.create_server(sockaddr[:2], family=family, backlog=backlog)
    except OSError as exc:
        raise OSError(exc.errno, f"Cannot listen for HTTP on {host}:{port}: {exc.strerror}") from None


class _Refused(asyncio.Protocol):
    def __init__(self, response: bytes) -> None:
        self._response = response

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses; both write and close.
        transport.write(self._response)  # type: ignore[attr-defined]
        transport.close()

    def data_received(self, data: bytes) -> None:
        pass  # the answer is already written; the request is not read


def limited_factory(server: web.Server, max_connections: int) -> Callable[[], asyncio.Protocol]:
    err = ApiError(429, f"The HTTP API already has {max_connections} connections ([http] max_connections); "
                   "retry shortly or reuse a connection.", code="overloaded", param=None)
    body = err.body()
    refusal = (
        b"HTTP/1.1 429 Too Many Requests\r\nContent-Type: application/json\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body
    )

    def factory() -> asyncio.Protocol:
        if len(server.connections) >= max_connections:
            return _Refused(refusal)
        return server()

    return factory
