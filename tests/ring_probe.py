"""Watching a ring from the outside: its header read with struct at SPEC 1.1's
offsets, and reader processes (`overlapd tail`, tests/ring_child.py) whose
JSON lines are collected with the time each arrived."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

RING_CHILD = str(Path(__file__).with_name("ring_child.py"))
FLAG_CLEAN_CLOSE = 1


@dataclass(frozen=True)
class RingHeader:
    epoch: int
    pid: int
    flags: int
    tail: int
    heartbeat_s: float  # CLOCK_MONOTONIC, comparable with time.monotonic()
    slots: list[tuple[int, int, int]]  # (cursor, pid, active) per backpressure reader slot

    def active_slots(self) -> list[tuple[int, int, int]]:
        return [s for s in self.slots if s[2]]


def ring_header(path: Path | str) -> RingHeader:
    with open(path, "rb") as f:
        b = f.read(8192)
    epoch, pid, flags = struct.unpack_from("<QII", b, 24)
    (tail,) = struct.unpack_from("<Q", b, 64)
    (heartbeat_ns,) = struct.unpack_from("<Q", b, 320)
    slots = [struct.unpack_from("<QII", b, 4096 + 64 * i) for i in range(64)]
    return RingHeader(epoch, pid, flags, tail, heartbeat_ns / 1e9, slots)


class JsonLines:
    """A child process printing JSON lines; each line is kept with its arrival time."""

    def __init__(self, argv: list[str]) -> None:
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: list[tuple[float, dict]] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._pump, daemon=True)
        self._thread.start()

    @classmethod
    def ring_child(cls, ring: Path | str, *flags: str) -> JsonLines:
        return cls([sys.executable, RING_CHILD, str(ring), *flags])

    @classmethod
    def tail(cls, ring: Path | str, *flags: str) -> JsonLines:
        return cls([sys.executable, "-m", "overlapd.daemon", "tail", str(ring), *flags])

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._lock:
                self.lines.append((time.monotonic(), json.loads(line)))

    def snapshot(self) -> list[tuple[float, dict]]:
        with self._lock:
            return list(self.lines)

    def wait_for(self, predicate, timeout: float = 30.0) -> tuple[float, dict]:
        """The first (time, line) that `predicate` accepts; fails after `timeout`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for t, line in self.snapshot():
                if predicate(line):
                    return t, line
            if self.proc.poll() is not None and not self._thread.is_alive():
                break
            time.sleep(0.005)
        raise AssertionError(f"no such line within {timeout}s; last: {self.snapshot()[-3:]} {self.stderr()}")

    def finish(self, timeout: float = 30.0) -> int:
        """Wait for the child to exit by itself; its exit code."""
        try:
            return self.proc.wait(timeout)
        finally:
            self._thread.join(5)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    def stderr(self) -> str:
        if self.proc.poll() is None or self.proc.stderr is None:
            return ""
        return self.proc.stderr.read()[-1000:]
