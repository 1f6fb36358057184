"""`[server]` table of the daemon's TOML config: the socket and its limits.

The full config file also has `[engine]`, `[ring]` and other tables owned by
other modules; this loader reads `[server]` only and ignores the rest.
"""

from __future__ import annotations

import difflib
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final, TypeVar

import msgspec
import tomllib

from .explain import explain_validation_error

SYSTEMD_SOCKET_PATH: Final = "/run/overlapd/overlapd.sock"
SOCKET_NAME: Final = "overlapd.sock"


def run_by_systemd(environ: Mapping[str, str] | None = None) -> bool:
    env = os.environ if environ is None else environ
    return any(env.get(k) for k in ("RUNTIME_DIRECTORY", "LISTEN_FDS", "NOTIFY_SOCKET"))


def default_socket_path(environ: Mapping[str, str] | None = None) -> str:
    """Where the daemon listens when nothing says otherwise (SPEC 2.1)."""
    env = os.environ if environ is None else environ
    runtime_dir = env.get("RUNTIME_DIRECTORY", "")
    if runtime_dir:
        # systemd passes a colon-separated list when several are configured.
        return os.path.join(runtime_dir.split(":")[0], SOCKET_NAME)
    if run_by_systemd(env):
        return SYSTEMD_SOCKET_PATH
    xdg = env.get("XDG_RUNTIME_DIR", "")
    if xdg:
        return os.path.join(xdg, SOCKET_NAME)
    return f"/tmp/overlapd-{os.getuid()}/{SOCKET_NAME}"


def _octal_mode(value: int | str) -> int:
    if isinstance(value, int):
        return value
    text = value.strip().lower().removeprefix("0o")
    try:
        return int(text, 8)
    except ValueError:
        raise ValueError(f"`socket_mode` must be an octal mode such as \"0660\", not {value!r}.") from None


class ServerConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """The socket server's settings; every limit bounds memory per client or in total."""

    socket_path: str = msgspec.field(default_factory=default_socket_path)
    # TOML: 0o660 (an integer) or "0660" (a string); always an int after loading.
    socket_mode: int | str = 0o660
    socket_group: str | int | None = None  # group name or gid the socket file is chowned to
    allowed_uids: list[int] | None = None  # None: whoever the file mode lets in; else checked with SO_PEERCRED
    max_frame_bytes: int = 1 << 20
    max_live_per_connection: int = 256
    max_live_total: int = 4096
    max_connections: int = 1024
    # A client more than this many bytes behind on reading its frames is
    # disconnected and its requests aborted: the pipeline never waits for one client.
    write_buffer_cap: int = 4 << 20
    drain_timeout_s: float = 20.0

    def __post_init__(self) -> None:
        self.socket_mode = _octal_mode(self.socket_mode)
        if not 0 <= self.socket_mode <= 0o777:
            raise ValueError(f"`socket_mode` must be between 0 and 0o777, not {oct(self.socket_mode)}.")
        if not self.socket_path:
            raise ValueError("`socket_path` must not be empty.")
        if len(os.fsencode(self.socket_path)) > 107:
            raise ValueError(
                f"`socket_path` is {len(os.fsencode(self.socket_path))} bytes; unix socket paths hold at most 107."
            )
        if isinstance(self.socket_group, str) and not self.socket_group:
            raise ValueError("`socket_group` must be a group name, a gid, or absent.")
        if self.allowed_uids is not None and any(u < 0 for u in self.allowed_uids):
            raise ValueError("`allowed_uids` must hold uids >= 0.")
        _at_least("max_frame_bytes", self.max_frame_bytes, 64, (1 << 32) - 1)
        _at_least("max_live_per_connection", self.max_live_per_connection, 1)
        _at_least("max_live_total", self.max_live_total, 1)
        _at_least("max_connections", self.max_connections, 1)
        _at_least("write_buffer_cap", self.write_buffer_cap, 4096)
        if not math.isfinite(self.drain_timeout_s) or self.drain_timeout_s < 0:
            raise ValueError(f"`drain_timeout_s` must be a finite number >= 0, not {self.drain_timeout_s}.")

    @property
    def mode(self) -> int:
        return int(self.socket_mode)


def _at_least(name: str, value: int, low: int, high: int | None = None) -> None:
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise ValueError(f"`{name}` must be {bound}, not {value}.")


SERVER_KEYS: Final = tuple(ServerConfig.__struct_fields__)
S = TypeVar("S", bound=msgspec.Struct)


class ConfigError(ValueError):
    """A config file or table the daemon cannot use; the message says what to fix."""


def struct_from_table(table: Mapping[str, Any], cls: type[S], *, name: str, source: str) -> S:
    """Build the Struct `cls` from the TOML table `[name]`, naming unknown keys and bad values."""
    where = f"[{name}] in {source}"
    if not isinstance(table, Mapping):
        raise ConfigError(f"{where} must be a table, not {type(table).__name__}.")
    known = cls.__struct_fields__
    unknown = [k for k in table if k not in known]
    if unknown:
        key = unknown[0]
        hint = difflib.get_close_matches(str(key), known, n=1)
        did_you_mean = f" (did you mean `{hint[0]}`?)" if hint else ""
        raise ConfigError(f"Unknown key `{key}` in {where}{did_you_mean}; the known keys are: {', '.join(known)}.")
    try:
        return msgspec.convert(dict(table), cls)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{where}: {explain_validation_error(exc, subject=where)[1]}") from None


def server_config_from_table(table: Mapping[str, Any], *, source: str = "the config") -> ServerConfig:
    """Build a ServerConfig from the `[server]` table's contents."""
    return struct_from_table(table, ServerConfig, name="server", source=source)


def read_toml_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    p = Path(path)
    try:
        with p.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"Config file {p} does not exist; create it or pass another --config.") from None
    except PermissionError:
        raise ConfigError(f"Config file {p} is not readable by this user; fix its permissions.") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p} is not valid TOML: {exc}.") from None


def load_server_config(path: str | os.PathLike[str]) -> ServerConfig:
    """Read `[server]` from a TOML file; a file without it gives the defaults."""
    return server_config_from_table(read_toml_file(path).get("server", {}), source=str(path))
