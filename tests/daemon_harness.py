"""Run a daemon as a real subprocess on a real socket and talk to it with raw
frames: the protocol test daemon (overlapd.daemon.echo_engine) by default,
or the real `overlapd serve` (tiny model, Paddle) through `serve_real`."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import msgspec
from overlapd.daemon.client import Client, ClientError
from overlapd.daemon.protocol import (
    DaemonFrame,
    FrameDecoder,
    decode_daemon_frame,
    encode_frame,
    encode_raw_frame,
)

START_TIMEOUT_S = 10.0
# `overlapd serve`: Paddle's import and the tiny model's first creation, on a loaded CI machine.
REAL_START_TIMEOUT_S = 60.0


_D = TypeVar("_D", bound="DaemonProcess")


class DaemonProcess:
    """What every test daemon subprocess offers: its stats over the socket, SIGTERM, kill."""

    proc: subprocess.Popen
    socket_path: Path
    TERMINATE_S = 10.0  # how long a SIGTERM drain may take before the test kills it

    def stats(self) -> dict[str, int | float]:
        with Client(self.socket_path, timeout=10) as c:
            return c.stats()

    def wait_stats(self, predicate, timeout: float = 10.0) -> dict[str, int | float]:
        deadline = time.monotonic() + timeout
        while True:
            s = self.stats()
            if predicate(s) or time.monotonic() > deadline:
                return s
            time.sleep(0.02)

    def terminate(self, timeout: float | None = None) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(self.TERMINATE_S if timeout is None else timeout)
        finally:
            self.kill()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    def wait_ready(self) -> None:
        raise NotImplementedError

    def ready(self: _D) -> _D:
        """wait_ready, killing the daemon if it never gets there; returns self."""
        try:
            self.wait_ready()
        except BaseException:
            self.kill()
            raise
        return self


class EchoDaemon(DaemonProcess):
    """A daemon subprocess: by default the protocol test engine, or any `overlapd` argv."""

    def __init__(
        self,
        socket_path: Path,
        *flags: str,
        listen_sock: socket.socket | None = None,
        argv: list[str] | None = None,
        start_timeout: float = START_TIMEOUT_S,
    ) -> None:
        self.socket_path = socket_path
        self.start_timeout = start_timeout
        if argv is None:
            argv = [sys.executable, "-m", "overlapd.daemon.echo_engine", *flags]
            if listen_sock is None:
                argv[3:3] = ["--socket", str(socket_path)]
        self.log_path = socket_path.with_suffix(".log")
        self._log = self.log_path.open("wb")
        if listen_sock is None:
            self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT)
        else:
            self.proc = spawn_activated(listen_sock, argv, name="overlapd", stdout=self._log, stderr=subprocess.STDOUT)

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode}: {self.log()}")
            try:
                with Client(self.socket_path, timeout=2) as c:
                    if c.health().status == "ok":
                        return
            except ClientError:
                time.sleep(0.02)
        raise TimeoutError(f"daemon not ready in {self.start_timeout}s: {self.log()}")

    def wait_logged(self, text: str) -> None:
        """Wait for `text` in the daemon's log: readiness where health cannot
        tell (a daemon that refuses us by uid)."""
        deadline = time.monotonic() + self.start_timeout
        while text not in self.log_path.read_text(errors="replace"):
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode}: {self.log()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{text!r} not logged in {self.start_timeout}s: {self.log()}")
            time.sleep(0.02)

    def client(self, timeout: float = 10) -> Client:
        return Client(self.socket_path, timeout=timeout)

    def raw(self) -> RawConn:
        return RawConn(self.socket_path)

    def kill(self) -> None:
        super().kill()
        self._log.close()

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")[-2000:]

    def rss_kib(self) -> int:
        return rss_kib(self.proc.pid)


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    """Resident set size of a live process (VmRSS), or another /proc/PID/status
    field in KiB: RssAnon leaves out mapped files and shared memory (the ring)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for pid {pid}")


def real_argv(tmp: Path, *flags: str, config: str | None = None) -> list[str]:
    """`overlapd serve` on tmp/d.sock and tmp/d.ring, with an optional TOML config."""
    argv = [sys.executable, "-m", "overlapd.daemon", "serve", "--socket", str(tmp / "d.sock"),
            "--ring", str(tmp / "d.ring"), "--model", "tiny"]
    if config is not None:
        cfg = tmp / "d.toml"
        cfg.write_text(config)
        argv += ["--config", str(cfg)]
    return [*argv, *flags]


def serve_real(tmp: Path, *flags: str, config: str | None = None, wait: bool = True) -> EchoDaemon:
    """Start the real daemon (tiny model, Paddle) in `tmp`; `d.ring_path` is its ring."""
    d = EchoDaemon(tmp / "d.sock", argv=real_argv(tmp, *flags, config=config), start_timeout=REAL_START_TIMEOUT_S)
    d.ring_path = tmp / "d.ring"  # type: ignore[attr-defined]
    if wait:
        d.ready()
    return d


def spawn_activated(listener: socket.socket, argv: list[str], *, name: str, **popen: object) -> subprocess.Popen:
    """Start argv the way systemd starts a socket-activated service: the socket
    on fd 3, LISTEN_PID set (after fork, before exec) to the pid that execs."""
    fd = listener.fileno()
    trampoline = (
        "import os, sys; os.dup2(int(sys.argv[1]), 3); "
        "os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS='1', LISTEN_FDNAMES=sys.argv[2]); "
        "os.execv(sys.argv[3], sys.argv[3:])"
    )
    return subprocess.Popen([sys.executable, "-c", trampoline, str(fd), name, *argv], pass_fds=(fd,), **popen)


@contextmanager
def echo_daemon(socket_path: Path, *flags: str, **kw: object) -> Iterator[EchoDaemon]:
    d = EchoDaemon(socket_path, *flags, **kw)  # type: ignore[arg-type]
    try:
        d.wait_ready()
        yield d
    finally:
        d.kill()


class RawConn:
    """A bare socket speaking frames by hand, for what a good client never sends."""

    def __init__(self, path: Path | str, timeout: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(os.fspath(path))
        self._dec = FrameDecoder(16 << 20)
        self._frames: list[DaemonFrame] = []

    def send(self, frame: msgspec.Struct | dict) -> None:
        if isinstance(frame, dict):
            self.sock.sendall(encode_raw_frame(msgspec.msgpack.encode(frame)))
        else:
            self.sock.sendall(encode_frame(frame))

    def send_bytes(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv(self) -> DaemonFrame | None:
        """The next frame, or None once the daemon closed the connection."""
        while not self._frames:
            data = self.sock.recv(65536)
            if not data:
                return None
            self._frames = [decode_daemon_frame(b) for b in self._dec.feed(data)]
        return self._frames.pop(0)

    def recv_until(self, predicate) -> list[DaemonFrame]:
        """Frames up to and including the first one `predicate` accepts."""
        out: list[DaemonFrame] = []
        while True:
            frame = self.recv()
            assert frame is not None, f"connection closed early; got {out[-5:]}"
            out.append(frame)
            if predicate(frame):
                return out

    def recv_until_end(self, id: str) -> list[DaemonFrame]:
        """Frames up to and including request `id`'s done/error (others kept too)."""
        out: list[DaemonFrame] = []
        while True:
            frame = self.recv()
            assert frame is not None, f"connection closed before {id!r} ended; got {out}"
            out.append(frame)
            if getattr(frame, "id", None) == id and type(frame).__name__ in ("DoneFrame", "ErrorFrame"):
                return out

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawConn:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncRawConn:
    """RawConn's asyncio twin: many of them in one thread make a crowd of clients."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self._dec = FrameDecoder(16 << 20)
        self._frames: list[DaemonFrame] = []

    @classmethod
    async def open(cls, path: Path | str) -> AsyncRawConn:
        reader, writer = await asyncio.open_unix_connection(os.fspath(path))
        return cls(reader, writer)

    def send(self, frame: msgspec.Struct | dict) -> None:
        if isinstance(frame, dict):
            self.writer.write(encode_raw_frame(msgspec.msgpack.encode(frame)))
        else:
            self.writer.write(encode_frame(frame))

    async def recv(self, timeout: float = 30.0) -> DaemonFrame | None:
        """The next frame, or None once the daemon closed the connection.

        A write that found the connection already closed (the daemon drained
        and hung up between two requests) fails later, here, as a broken pipe
        or a reset: that is a close too, not an error of the daemon's."""
        while not self._frames:
            try:
                data = await asyncio.wait_for(self.reader.read(65536), timeout)
            except (BrokenPipeError, ConnectionResetError):
                return None
            if not data:
                return None
            self._frames = [decode_daemon_frame(b) for b in self._dec.feed(data)]
        return self._frames.pop(0)

    def abort(self) -> None:
        """Vanish without a goodbye: RST instead of FIN where the transport allows."""
        self.writer.transport.abort()

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except (ConnectionError, OSError):
            pass
