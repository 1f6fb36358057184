"""systemd's service protocols without libsystemd: sd_notify and sd_listen_fds.

sd_notify: newline-separated VAR=value assignments in one datagram to the
AF_UNIX socket named by $NOTIFY_SOCKET ('@' prefix = abstract namespace).
sd_listen_fds: inherited listening sockets start at fd 3; $LISTEN_PID must be
our pid (the variables are inherited by children that must not use them), and
$LISTEN_FDNAMES holds colon-separated names.

Everything is a no-op returning False / [] when not run by systemd, so the
daemon calls these unconditionally.
"""

from __future__ import annotations

import asyncio
import os
import socket
import stat
import time
from collections.abc import Callable, MutableMapping
from typing import Final, NamedTuple

SD_LISTEN_FDS_START: Final = 3
_LISTEN_VARS: Final = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


def _environ(environ: MutableMapping[str, str] | None) -> MutableMapping[str, str]:
    return os.environ if environ is None else environ


def _notify_address(raw: str) -> str | bytes | None:
    if raw.startswith("/"):
        return raw
    if raw.startswith("@") and len(raw) > 1:
        return b"\0" + raw[1:].encode()
    return None  # vsock: and other transports are not used by this daemon


def _one_line(text: str) -> str:
    # A newline would start a new assignment: a status text must not be able
    # to smuggle e.g. "MAINPID=1" into the datagram.
    return " ".join(text.splitlines())


class Notifier:
    """Sends state changes to the service manager; reuse one per process."""

    def __init__(self, environ: MutableMapping[str, str] | None = None, *, unset_environment: bool = False) -> None:
        env = _environ(environ)
        raw = env.get("NOTIFY_SOCKET", "")
        self._address = _notify_address(raw) if raw else None
        self._sock: socket.socket | None = None
        if unset_environment:
            env.pop("NOTIFY_SOCKET", None)

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def send(self, *assignments: str) -> bool:
        """Send VAR=value lines in one datagram; True when the manager got them."""
        if self._address is None or not assignments:
            return False
        payload = "\n".join(assignments).encode()
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto(payload, self._address)
        except OSError:
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        lines = ["READY=1", f"MAINPID={os.getpid()}"]
        if status:
            lines.append(f"STATUS={_one_line(status)}")
        return self.send(*lines)

    def status(self, text: str) -> bool:
        return self.send(f"STATUS={_one_line(text)}")

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def stopping(self, status: str | None = None) -> bool:
        lines = ["STOPPING=1"]
        if status:
            lines.append(f"STATUS={_one_line(status)}")
        return self.send(*lines)

    def reloading(self) -> bool:
        # MONOTONIC_USEC lets Type=notify-reload (systemd 253+) match the reply.
        return self.send("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")

    def mainpid(self, pid: int) -> bool:
        return self.send(f"MAINPID={pid}")

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for more start/stop time (long model loads, long drains)."""
        return self.send(f"EXTEND_TIMEOUT_USEC={int(seconds * 1_000_000)}")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def notify(*assignments: str, environ: MutableMapping[str, str] | None = None) -> bool:
    """One-shot sd_notify, e.g. notify("READY=1", "STATUS=serving")."""
    n = Notifier(environ)
    try:
        return n.send(*assignments)
    finally:
        n.close()


def watchdog_interval(environ: MutableMapping[str, str] | None = None) -> float | None:
    """WatchdogSec in seconds, or None when no watchdog is configured for this process.

    Ping at least every half of it (sd_watchdog_enabled's advice).
    """
    env = _environ(environ)
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    pid = env.get("WATCHDOG_PID", "")
    if pid:
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            return None
    return usec / 1_000_000


async def watchdog_loop(notifier: Notifier, interval_s: float, healthy: Callable[[], bool] = lambda: True) -> None:
    """Ping WATCHDOG=1 every interval/2 while `healthy()`; run it as a task, cancel it to stop.

    A stuck event loop stops the pings by itself, which is the point.
    """
    period = max(interval_s / 2, 0.05)
    while True:
        if healthy():
            notifier.watchdog()
        await asyncio.sleep(period)


class ListenSocket(NamedTuple):
    name: str
    sock: socket.socket


def listen_fds(
    *, unset_environment: bool = True, environ: MutableMapping[str, str] | None = None
) -> list[ListenSocket]:
    """Sockets passed by systemd socket activation, fd 3 upwards, with their names.

    Returns [] unless $LISTEN_PID is this process. The fds are made
    close-on-exec so children do not inherit them (as sd_listen_fds does).
    """
    env = _environ(environ)
    values = {k: env.get(k) for k in _LISTEN_VARS}
    if unset_environment:
        for k in _LISTEN_VARS:
            env.pop(k, None)
    try:
        if int(values["LISTEN_PID"] or "") != os.getpid():
            return []
        count = int(values["LISTEN_FDS"] or "")
    except ValueError:
        return []
    if count <= 0:
        return []
    names = (values["LISTEN_FDNAMES"] or "").split(":")
    if len(names) != count:
        names = ["unknown"] * count
    found: list[ListenSocket] = []
    for i in range(count):
        fd = SD_LISTEN_FDS_START + i
        try:
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                continue
            os.set_inheritable(fd, False)
            found.append(ListenSocket(names[i], socket.socket(fileno=fd)))
        except OSError:
            continue
    return found


def is_listening_unix_stream(sock: socket.socket) -> bool:
    try:
        accepting = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    except OSError:
        return False
    return sock.family == socket.AF_UNIX and sock.type == socket.SOCK_STREAM and bool(accepting)


def inherited_unix_listener(
    name: str | None = None, *, environ: MutableMapping[str, str] | None = None
) -> socket.socket | None:
    """The first inherited listening AF_UNIX stream socket (named `name` if given), or None.

    Other inherited sockets are closed: the daemon has a use for one only.
    """
    chosen: socket.socket | None = None
    for entry in listen_fds(environ=environ):
        if chosen is None and (name is None or entry.name == name) and is_listening_unix_stream(entry.sock):
            chosen = entry.sock
        else:
            entry.sock.close()
    return chosen


HTTP_FD_NAME: Final = "http"


class InheritedListeners(NamedTuple):
    unix: socket.socket | None
    http: socket.socket | None


def is_listening_tcp(sock: socket.socket) -> bool:
    try:
        accepting = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    except OSError:
        return False
    return sock.family in (socket.AF_INET, socket.AF_INET6) and sock.type == socket.SOCK_STREAM and bool(accepting)


def inherited_listeners(*, environ: MutableMapping[str, str] | None = None) -> InheritedListeners:
    """The daemon's sockets from systemd: the first listening AF_UNIX stream
    socket (the protocol socket, any name) and the listening TCP socket named
    `http` (FileDescriptorName=http, from overlapd-http.socket). Others are closed."""
    unix: socket.socket | None = None
    http: socket.socket | None = None
    for entry in listen_fds(environ=environ):
        if unix is None and is_listening_unix_stream(entry.sock):
            unix = entry.sock
        elif http is None and entry.name == HTTP_FD_NAME and is_listening_tcp(entry.sock):
            http = entry.sock
        else:
            entry.sock.close()
    return InheritedListeners(unix, http)
