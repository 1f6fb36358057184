"""The whole daemon's settings: one TOML file, command-line flags on top.

    [server]    socket, permissions, limits      (daemon/config.py)
    [engine]    model, runtime, batch and KV sizes (stages/engine_config.py)
    [pipeline]  overlap, queue bounds           (stages/pipeline_config.py)
    [ring]      path, capacity, mode, backpressure
"""

from __future__ import annotations

import argparse
import difflib
import tomllib
from pathlib import Path
from typing import Any

import msgspec

from overlapd.daemon.config import ConfigError, ServerConfig, server_config_from_table
from overlapd.daemon.engine_options import engine_config_from_args
from overlapd.daemon.explain import explain_validation_error
from overlapd.stages.engine_config import EngineConfig
from overlapd.stages.pipeline_config import PipelineConfig, RingConfig

TABLES = ("server", "engine", "pipeline", "ring")

__all__ = ["ConfigError", "DaemonConfig", "load_daemon_config"]


class DaemonConfig(msgspec.Struct, kw_only=True):
    server: ServerConfig
    engine: EngineConfig
    pipeline: PipelineConfig
    ring: RingConfig


def _table(data: dict[str, Any], name: str, cls: type, source: str) -> Any:
    table = data.get(name, {})
    where = f"[{name}] in {source}"
    if not isinstance(table, dict):
        raise ConfigError(f"{where} must be a table.")
    known = cls.__struct_fields__
    for key in table:
        if key not in known:
            hint = difflib.get_close_matches(key, known, n=1)
            raise ConfigError(
                f"Unknown key `{key}` in {where}" + (f" (did you mean `{hint[0]}`?)" if hint else "")
                + f"; the known keys are: {', '.join(known)}."
            )
    try:
        return msgspec.convert(table, cls)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{where}: {explain_validation_error(exc, subject=where)[1]}") from None


def read_toml(path: str) -> dict[str, Any]:
    p = Path(path)
    try:
        with p.open("rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {p} does not exist; create it or pass another --config") from None
    except PermissionError:
        raise ConfigError(f"config file {p} is not readable by this user") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p} is not valid TOML: {exc}") from None
    unknown = [k for k in data if k not in TABLES]
    if unknown:
        raise ConfigError(f"unknown table [{unknown[0]}] in {p}; the tables are: {', '.join(TABLES)}")
    return data


def load_daemon_config(args: argparse.Namespace) -> DaemonConfig:
    """The config file (if any) with the command line's flags applied."""
    data: dict[str, Any] = read_toml(args.config) if args.config else {}
    source = args.config or "the defaults"
    server = server_config_from_table(data.get("server", {}), source=source)
    engine = engine_config_from_args(args, _table(data, "engine", EngineConfig, source))
    pipeline = _table(data, "pipeline", PipelineConfig, source)
    ring = _table(data, "ring", RingConfig, source)
    if args.socket:
        server = msgspec.structs.replace(server, socket_path=args.socket)
    if args.drain_timeout is not None:
        server = msgspec.structs.replace(server, drain_timeout_s=args.drain_timeout)
    if args.no_overlap:
        pipeline = msgspec.structs.replace(pipeline, overlap=False)
    if args.ring:
        ring = msgspec.structs.replace(ring, path=args.ring)
    if args.no_ring:
        ring = msgspec.structs.replace(ring, enabled=False)
    if args.ring_backpressure:
        ring = msgspec.structs.replace(ring, backpressure=True)
    return DaemonConfig(server=server, engine=engine, pipeline=pipeline, ring=ring)
