"""The whole daemon's settings: one TOML file, command-line flags on top.

    [server]    socket, permissions, limits      (daemon/config.py)
    [engine]    model, runtime, batch and KV sizes (stages/engine/config.py)
    [pipeline]  overlap, queue bounds           (stages/pipeline_config.py)
    [ring]      path, capacity, mode, backpressure
    [http]      the OpenAI-compatible API: address, API keys, limits (daemon/http/config.py)
"""

from __future__ import annotations

import argparse
from typing import Any

import msgspec
from overlapd.daemon.config import (
    ConfigError,
    S,
    ServerConfig,
    read_toml_file,
    struct_from_table,
)
from overlapd.daemon.engine_options import engine_config_from_args
from overlapd.daemon.http.config import HttpConfig
from overlapd.stages.engine.config import EngineConfig
from overlapd.stages.pipeline_config import PipelineConfig, RingConfig

TABLES = ("server", "engine", "pipeline", "ring", "http")

__all__ = ["ConfigError", "DaemonConfig", "load_daemon_config"]


class DaemonConfig(msgspec.Struct, kw_only=True):
    server: ServerConfig
    engine: EngineConfig
    pipeline: PipelineConfig
    ring: RingConfig
    http: HttpConfig = msgspec.field(default_factory=HttpConfig)


def read_config_file(path: str) -> dict[str, Any]:
    data = read_toml_file(path)
    unknown = [k for k in data if k not in TABLES]
    if unknown:
        raise ConfigError(f"Unknown table [{unknown[0]}] in {path}; the tables are: {', '.join(TABLES)}.")
    return data


def load_daemon_config(args: argparse.Namespace) -> DaemonConfig:
    """The config file (if any) with the command line's flags applied."""
    data: dict[str, Any] = read_config_file(args.config) if args.config else {}
    source = args.config or "the defaults"

    def table(name: str, cls: type[S]) -> S:
        return struct_from_table(data.get(name, {}), cls, name=name, source=source)

    server = table("server", ServerConfig)
    engine = engine_config_from_args(args, table("engine", EngineConfig))
    pipeline = table("pipeline", PipelineConfig)
    ring = table("ring", RingConfig)
    http = table("http", HttpConfig)
    if args.socket:
        server = msgspec.structs.replace(server, socket_path=args.socket)
    if args.drain_timeout is not None:
        server = msgspec.structs.replace(server, drain_timeout_s=args.drain_timeout)
    if args.no_overlap:
        pipeline = msgspec.structs.replace(pipeline, overlap=False)
    if args.overlap_depth is not None:
        pipeline = PipelineConfig(**{**msgspec.structs.asdict(pipeline), "overlap_depth": args.overlap_depth})
    if args.ring:
        ring = msgspec.structs.replace(ring, path=args.ring)
    if args.no_ring:
        ring = msgspec.structs.replace(ring, enabled=False)
    if args.ring_backpressure:
        ring = msgspec.structs.replace(ring, backpressure=True)
    if getattr(args, "http", None):
        http = _replace_checked(http, listen=args.http)
    if getattr(args, "api_key_file", None):
        http = _replace_checked(http, api_key_file=args.api_key_file)
    return DaemonConfig(server=server, engine=engine, pipeline=pipeline, ring=ring, http=http)


def _replace_checked(cfg: S, **changes: Any) -> S:
    """msgspec.structs.replace without skipping __post_init__'s checks."""
    return type(cfg)(**{**msgspec.structs.asdict(cfg), **changes})
