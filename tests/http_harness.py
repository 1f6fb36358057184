"""The real daemon (`overlapd serve --model tiny`) with its HTTP API on, for the HTTP tests.

`serve_http` starts it on an HTTP port the kernel picks (read back from the
daemon's log); `serve_http_activated` hands it a unix and a TCP listener the
way systemd does with two socket units (LISTEN_FDNAMES=overlapd:http).
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from daemon_harness import DaemonProcess

START_TIMEOUT_S = 60.0  # Paddle's import and the tiny model, on a loaded CI machine
API_KEY = "test-key-0123456789abcdef"


class HttpDaemon(DaemonProcess):
    TERMINATE_S = 30.0  # a drain also waits for HTTP streams

    def __init__(self, tmp: Path, proc: subprocess.Popen, log_path: Path, port: int | None) -> None:
        self.tmp = tmp
        self.proc = proc
        self.log_path = log_path
        self.socket_path = tmp / "d.sock"
        self.port = port

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode}: {self.log()}")
            if self.port is None:
                self.port = logged_port(self.log_path)
            if self.port is not None:
                try:
                    with urllib.request.urlopen(self.base_url + "/health", timeout=2) as r:
                        if r.status == 200:
                            return
                except (urllib.error.URLError, ConnectionError, TimeoutError):
                    pass
            time.sleep(0.05)
        raise TimeoutError(f"daemon not ready in {START_TIMEOUT_S}s: {self.log()}")

    def wait_stats(self, predicate, timeout: float = 20.0) -> dict[str, int | float]:
        return super().wait_stats(predicate, timeout)


def logged_port(log_path: Path) -> int | None:
    for line in log_path.read_text(errors="replace").splitlines():
        if '"http_listening"' in line:
            return int(json.loads(line)["address"].rsplit(":", 1)[1])
    return None


def serve_argv(tmp: Path, *flags: str, config: str | None = None) -> list[str]:
    argv = [sys.executable, "-m", "overlapd.daemon", "serve", "--model", "tiny",
            "--socket", str(tmp / "d.sock"), "--ring", str(tmp / "d.ring")]
    if config is not None:
        (tmp / "d.toml").write_text(config)
        argv += ["--config", str(tmp / "d.toml")]
    return [*argv, *flags]


def serve_http(tmp: Path, *flags: str, config: str | None = None) -> HttpDaemon:
    """The real daemon with `--http 127.0.0.1:0` (unless flags name another), ready."""
    if "--http" not in flags and (config is None or "listen" not in config):
        flags = ("--http", "127.0.0.1:0", *flags)
    log_path = tmp / "d.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(serve_argv(tmp, *flags, config=config), stdout=log, stderr=subprocess.STDOUT)
    return HttpDaemon(tmp, proc, log_path, None).ready()


def serve_http_activated(tmp: Path, *flags: str) -> tuple[HttpDaemon, socket.socket, socket.socket]:
    """The real daemon given a unix listener (fd 3, `overlapd`) and a TCP one
    (fd 4, `http`) as systemd passes them; no --socket, no --http."""
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    unix.bind(str(tmp / "d.sock"))
    unix.listen(64)
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.bind(("127.0.0.1", 0))
    tcp.listen(64)
    argv = [sys.executable, "-m", "overlapd.daemon", "serve", "--model", "tiny", "--ring", str(tmp / "d.ring"), *flags]
    # Move both into place through fds >= 100, so the first dup2 cannot overwrite the second's source.
    trampoline = (
        "import fcntl, os, sys; high = [fcntl.fcntl(int(f), fcntl.F_DUPFD, 100) for f in sys.argv[1:3]]; "
        "[os.dup2(h, 3 + i) for i, h in enumerate(high)]; [os.close(h) for h in high]; "
        "os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS='2', LISTEN_FDNAMES='overlapd:http'); "
        "os.execv(sys.argv[3], sys.argv[3:])"
    )
    log_path = tmp / "d.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-c", trampoline, str(unix.fileno()), str(tcp.fileno()), *argv],
            pass_fds=(unix.fileno(), tcp.fileno()), stdout=log, stderr=subprocess.STDOUT,
        )
    d = HttpDaemon(tmp, proc, log_path, tcp.getsockname()[1])
    return d.ready(), unix, tcp


