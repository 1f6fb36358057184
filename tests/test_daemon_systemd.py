"""The real daemon as systemd runs it: socket activation, READY/STOPPING, SIGHUP reopening logs."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

from daemon_harness import spawn_activated

from overlapd.daemon.client import Client

START_S = 60.0


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise TimeoutError(what)


def test_socket_activation_and_sd_notify(tmp_path):
    sock_path = tmp_path / "act.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(sock_path))
    listener.listen(16)
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.settimeout(START_S)
    env = dict(os.environ, NOTIFY_SOCKET=str(tmp_path / "notify"))
    argv = [sys.executable, "-m", "overlapd.daemon", "serve", "--model", "tiny", "--ring", str(tmp_path / "act.ring")]
    proc = spawn_activated(listener, argv, name="overlapd", env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        messages: list[str] = []
        while not any("READY=1" in m for m in messages):
            messages.append(notify.recv(4096).decode())
        # The daemon serves on the socket systemd handed it: no path of its own.
        with Client(sock_path, timeout=30) as c:
            assert c.complete("hi", max_tokens=3, ignore_eos=True).usage.completion_tokens == 3
        proc.send_signal(signal.SIGTERM)
        while not any("STOPPING=1" in m for m in messages):
            messages.append(notify.recv(4096).decode())
        assert proc.wait(30) == 0
        assert any(m.startswith("STATUS=") or "\nSTATUS=" in m for m in messages)
    finally:
        if proc.poll() is None:
            proc.kill()
        listener.close()
        notify.close()


def test_sighup_reopens_the_log_file(tmp_path):
    sock, log = tmp_path / "d.sock", tmp_path / "overlapd.log"
    argv = [sys.executable, "-m", "overlapd.daemon", "serve", "--model", "tiny", "--socket", str(sock), "--no-ring",
            "--log-file", str(log)]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: log.exists() and '"ready"' in log.read_text(), START_S, "daemon ready")
        rotated = tmp_path / "overlapd.log.1"
        log.rename(rotated)  # what logrotate does before it signals
        proc.send_signal(signal.SIGHUP)
        wait_for(log.exists, 10, "log reopened")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert '"stopped"' in log.read_text() and '"stopped"' not in rotated.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
