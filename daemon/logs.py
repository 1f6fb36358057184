"""structlog set-up: JSON lines to stdout (journald) or to a file that SIGHUP reopens."""

from __future__ import annotations

import logging
import sys
from typing import TextIO

import structlog


class ReopenableStream:
    """A log file that can be reopened after logrotate moved it (SIGHUP)."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self.stream: TextIO = sys.stdout if path is None else open(path, "a", buffering=1, encoding="utf-8")

    def write(self, text: str) -> int:
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()

    def reopen(self) -> None:
        if self.path is None:
            return  # stdout belongs to systemd's journal: nothing to reopen
        old = self.stream
        self.stream = open(self.path, "a", buffering=1, encoding="utf-8")
        old.close()


def configure_logging(path: str | None = None, level: str = "info") -> ReopenableStream:
    stream = ReopenableStream(path)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )
    return stream


def configure_cli_logging(level: str = "warning") -> None:
    """For commands whose stdout is their output (`generate`): readable lines on stderr, warnings and up."""
    structlog.configure(
        processors=[structlog.processors.add_log_level, structlog.dev.ConsoleRenderer(colors=False)],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=False,
    )
