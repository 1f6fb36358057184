"""sd_notify and sd_listen_fds against real sockets, the way systemd uses them."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import uuid

import pytest

from daemon_harness import spawn_activated

from overlapd.daemon.systemd_notify import Notifier, listen_fds, notify, watchdog_interval


@pytest.fixture
def manager(tmp_path):
    """A datagram socket standing in for systemd's notify socket."""
    path = str(tmp_path / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(5)
    yield path, sock
    sock.close()


def lines(sock: socket.socket) -> list[str]:
    return sock.recv(4096).decode().split("\n")


def test_ready_status_watchdog_stopping_arrive(manager):
    path, sock = manager
    n = Notifier({"NOTIFY_SOCKET": path})
    assert n.enabled
    assert n.ready("loading done")
    assert lines(sock) == ["READY=1", f"MAINPID={os.getpid()}", "STATUS=loading done"]
    assert n.status("serving 3 clients")
    assert lines(sock) == ["STATUS=serving 3 clients"]
    assert n.watchdog()
    assert lines(sock) == ["WATCHDOG=1"]
    assert n.stopping("draining")
    assert lines(sock) == ["STOPPING=1", "STATUS=draining"]
    assert n.mainpid(1234)
    assert lines(sock) == ["MAINPID=1234"]
    n.close()


def test_a_status_text_cannot_inject_assignments(manager):
    path, sock = manager
    assert notify("STATUS=ok", environ={"NOTIFY_SOCKET": path})
    assert lines(sock) == ["STATUS=ok"]
    n = Notifier({"NOTIFY_SOCKET": path})
    n.status("evil\nMAINPID=1\nREADY=1")
    assert lines(sock) == ["STATUS=evil MAINPID=1 READY=1"]


def test_abstract_namespace_socket():
    name = f"overlapd-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(5)
    try:
        assert Notifier({"NOTIFY_SOCKET": "@" + name}).ready()
        assert lines(sock)[0] == "READY=1"
    finally:
        sock.close()


def test_without_notify_socket_everything_is_a_quiet_no():
    n = Notifier({})
    assert not n.enabled
    assert not n.ready() and not n.watchdog() and not n.stopping()
    assert not Notifier({"NOTIFY_SOCKET": "/nonexistent/dir/sock"}).ready()


def test_unset_environment_removes_notify_socket(manager):
    env = {"NOTIFY_SOCKET": manager[0]}
    assert Notifier(env, unset_environment=True).ready()
    assert "NOTIFY_SOCKET" not in env


def test_watchdog_interval():
    assert watchdog_interval({}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 30.0
    assert watchdog_interval({"WATCHDOG_USEC": "500000", "WATCHDOG_PID": str(os.getpid())}) == 0.5
    assert watchdog_interval({"WATCHDOG_USEC": "500000", "WATCHDOG_PID": str(os.getpid() + 1)}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "soon"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "0"}) is None


def test_listen_fds_ignores_variables_meant_for_another_process():
    env = {"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": "1"}
    assert listen_fds(environ=env) == []
    assert env == {}  # unset after reading, as sd_listen_fds(1) does


CHILD = textwrap.dedent(
    """
    import os, socket, sys
    from overlapd.daemon.systemd_notify import listen_fds, is_listening_unix_stream
    found = listen_fds()
    leftover = [k for k in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES") if k in os.environ]
    (name, sock), = found
    assert sock.fileno() == 3 and not os.get_inheritable(3)
    assert is_listening_unix_stream(sock)
    conn, _ = sock.accept()
    conn.sendall(f"{name} {leftover}".encode())
    conn.close()
    """
)


def test_listen_fds_with_a_real_inherited_socket(tmp_path):
    path = str(tmp_path / "activated.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen()
    child = spawn_activated(listener, [sys.executable, "-c", CHILD], name="api")
    try:
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.settimeout(10)
        client.connect(path)
        assert client.recv(100).decode() == "api []"
        assert child.wait(timeout=10) == 0
    finally:
        child.kill()
        listener.close()


def test_echo_daemon_reports_ready_and_stopping(manager, tmp_path):
    """A real daemon process speaks sd_notify: READY once serving, STOPPING on SIGTERM."""
    path, sock = manager
    env = {**os.environ, "NOTIFY_SOCKET": path}
    proc = subprocess.Popen(
        [sys.executable, "-m", "overlapd.daemon.echo_engine", "--socket", str(tmp_path / "d.sock")],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        got = lines(sock)
        assert got[0] == "READY=1" and f"MAINPID={proc.pid}" in got
        assert os.path.exists(tmp_path / "d.sock")  # READY means the socket is up
        proc.send_signal(signal.SIGTERM)
        assert lines(sock)[0] == "STOPPING=1"
        assert proc.wait(timeout=10) == 0
    finally:
        proc.kill()
