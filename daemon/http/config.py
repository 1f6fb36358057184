"""`[http]` table of the daemon's config: where the OpenAI-compatible API listens and its limits.

Off unless `listen` is set (or `--http` given, or systemd hands over a socket
named `http`). A bare port binds 127.0.0.1: the API is reachable from other
hosts only when the operator names an address for it.
"""

from __future__ import annotations

import hmac
import os
from typing import Final

import msgspec

DEFAULT_HOST: Final = "127.0.0.1"
MAX_API_KEYS: Final = 1024
MAX_KEY_FILE_BYTES: Final = 1 << 20


class HttpConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    listen: str | None = None  # "HOST:PORT", "[v6]:PORT" or "PORT"; None: no HTTP API
    api_key_file: str | None = None  # one bearer token per line; None: no keys asked for
    max_body_bytes: int = 1 << 20  # a bigger request body is answered 413 without being read
    max_live: int = 1024  # HTTP requests generating at once; more are answered 429
    max_connections: int = 1024  # open HTTP connections (idle keep-alive ones too); more get a 429 and are closed
    # A stream whose client reads this many token events less than the engine
    # produced is cut off and aborted: the pipeline never waits for one client.
    max_buffered_events: int = 4096
    default_chat_max_tokens: int = 256  # chat requests without max_tokens (OpenAI's default is "no limit")

    def __post_init__(self) -> None:
        if self.listen is not None:
            parse_listen(self.listen)  # raises ValueError naming the problem
        for name in ("max_body_bytes", "max_live", "max_connections", "max_buffered_events", "default_chat_max_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be at least 1, not {getattr(self, name)}.")
        if self.max_body_bytes > 1 << 30:
            raise ValueError(f"`max_body_bytes` must be at most {1 << 30}, not {self.max_body_bytes}.")


def parse_listen(text: str) -> tuple[str, int]:
    """'HOST:PORT' | '[v6]:PORT' | 'PORT' -> (host, port); a bare port means 127.0.0.1."""
    text = text.strip()
    host, sep, port_text = text.rpartition(":")
    if not sep:
        host, port_text = DEFAULT_HOST, text
    elif host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"`{text}`: write an IPv6 address in brackets, e.g. [::1]:8000.")
    if not host:
        raise ValueError(f"`{text}`: name the address to listen on, e.g. 127.0.0.1:{port_text or 8000}.")
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"`{text}`: the port must be a number, e.g. 127.0.0.1:8000.") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"`{text}`: the port must be between 0 and 65535.")
    return host, port


class ApiKeys:
    """Bearer tokens from a file; compared in constant time, every key every time."""

    def __init__(self, keys: list[bytes]) -> None:
        self._keys = keys

    @classmethod
    def from_file(cls, path: str) -> ApiKeys:
        try:
            with open(path, "rb") as f:
                raw = f.read(MAX_KEY_FILE_BYTES + 1)
        except OSError as exc:
            raise ValueError(f"Cannot read the API key file {path}: {exc.strerror}.") from None
        if len(raw) > MAX_KEY_FILE_BYTES:
            raise ValueError(f"The API key file {path} is over {MAX_KEY_FILE_BYTES} bytes; it should hold one key a line.")
        keys = [line.strip() for line in raw.splitlines()]
        keys = [k for k in keys if k and not k.startswith(b"#")]
        if not keys:
            raise ValueError(f"The API key file {path} holds no key; put one bearer token on each line.")
        if len(keys) > MAX_API_KEYS:
            raise ValueError(f"The API key file {path} holds {len(keys)} keys; at most {MAX_API_KEYS} are read.")
        if any(len(k) < 16 for k in keys):
            raise ValueError(f"The API key file {path} holds a key shorter than 16 characters; use longer random keys.")
        if os.stat(path).st_mode & 0o004:
            raise ValueError(f"The API key file {path} is readable by every user; chmod o-r it.")
        return cls(keys)

    def allows(self, authorization: str | None) -> bool:
        if not authorization:
            return False
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer":
            return False
        presented = token.strip().encode("utf-8", "replace")
        ok = False
        for key in self._keys:
            ok |= hmac.compare_digest(presented, key)
        return ok
