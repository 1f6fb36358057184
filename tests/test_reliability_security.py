"""Issue 6, item 8, against the REAL daemon: who may reach the socket and the
ring, and how much one frame may carry.

* the socket is 0660 and the ring 0640 by default, both of the daemon's user,
  and both can be given to a configured group;
* `[server] allowed_uids` is checked with SO_PEERCRED: other uids get one
  error frame and a closed connection. As root, this runs across real uids:
  a child process that drops to `nobody` is refused by the file modes, and
  admitted by a daemon whose allow-list names it while root is refused;
* a frame above `max_frame_bytes` is answered `too_large` and cut off; a
  frame of exactly the limit is decoded (and its too-long prompt refused).

No pickle or eval: tests/test_hostile_clients.py greps the package.
Systemd exposure: tests/test_systemd_units.py.
"""

from __future__ import annotations

import grp
import os
import socket
import stat
import tempfile
from pathlib import Path

import msgspec
import pytest
from daemon_harness import RawConn, serve_real

from overlapd.daemon.protocol import ErrorFrame, HealthQuery, encode_frame, encode_raw_frame

NOBODY = 65534
IS_ROOT = os.getuid() == 0


def other_group() -> tuple[str, int]:
    """A real group to hand the files to: as root any existing group other than
    ours (root may chown to any); otherwise our own gid, the one we may give."""
    if IS_ROOT:
        for g in grp.getgrall():
            if g.gr_gid != os.getgid():
                return g.gr_name, g.gr_gid
    return grp.getgrgid(os.getgid()).gr_name, os.getgid()


@pytest.fixture
def open_dir():
    """A directory anyone may traverse: what stops another uid must be the
    file modes and the allow-list, not pytest's 0700 temp root."""
    path = Path(tempfile.mkdtemp(prefix="ovl-sec-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    for child in path.iterdir():
        child.unlink()
    path.rmdir()


def as_uid(uid: int, action) -> str:
    """Run `action()` in a forked child that dropped to `uid`; its string result
    (or the exception's name)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no return from here
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            try:
                out = action()
            except Exception as exc:  # noqa: BLE001 - reported to the parent
                out = type(exc).__name__
            os.write(w, out.encode()[:4096])
        finally:
            os._exit(0)
    os.close(w)
    try:
        with os.fdopen(r, "rb") as f:
            return f.read().decode()
    finally:
        os.waitpid(pid, 0)


def ask_health(path: Path) -> str:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(str(path))
    s.sendall(encode_frame(HealthQuery()))
    data = s.recv(65536)
    s.close()
    body = msgspec.msgpack.decode(data[4:])
    return f"{body['type']}:{body.get('code', body.get('status'))}"


def test_socket_0660_and_ring_0640_by_default_and_frames_are_size_limited(open_dir):
    d = serve_real(open_dir)
    try:
        sock, ring = os.stat(d.socket_path), os.stat(d.ring_path)
        assert stat.S_ISSOCK(sock.st_mode) and stat.S_IMODE(sock.st_mode) == 0o660
        assert stat.S_IMODE(ring.st_mode) == 0o640
        assert sock.st_uid == ring.st_uid == os.getuid()
        if IS_ROOT:  # another uid, not in the group: neither file opens
            assert as_uid(NOBODY, lambda: ask_health(d.socket_path)) == "PermissionError"
            assert as_uid(NOBODY, lambda: open(d.ring_path, "rb").read(8).decode()) == "PermissionError"
        limit = 1 << 20  # [server] max_frame_bytes' default
        with RawConn(d.socket_path) as raw:
            raw.send_bytes((limit + 1).to_bytes(4, "big"))
            err = raw.recv()
            assert isinstance(err, ErrorFrame) and err.code == "too_large" and "max_frame_bytes" in err.message
            assert raw.recv() is None
        with RawConn(d.socket_path) as raw:  # exactly at the limit: decoded, then refused on its merits
            head = msgspec.msgpack.encode({"type": "generate", "id": "edge", "prompt": ""})
            pad = limit - len(head) - 4  # the str8 header grows to a str32 header (5 bytes, not 1)
            body = msgspec.msgpack.encode({"type": "generate", "id": "edge", "prompt": "p" * pad})
            assert len(body) == limit, len(body)
            raw.send_bytes(encode_raw_frame(body))
            err = raw.recv()
            assert isinstance(err, ErrorFrame) and err.code == "invalid_request" and "prompt" in err.message
        assert d.terminate() == 0
    finally:
        d.kill()


def test_the_group_and_modes_are_configurable(tmp_path):
    name, gid = other_group()
    config = (
        f'[server]\nsocket_group = "{name}"\nsocket_mode = "0600"\n'
        f'[ring]\ngroup = "{name}"\nmode = 0o600\n'
    )
    d = serve_real(tmp_path, config=config)
    try:
        sock, ring = os.stat(d.socket_path), os.stat(d.ring_path)
        assert (sock.st_gid, stat.S_IMODE(sock.st_mode)) == (gid, 0o600)
        assert (ring.st_gid, stat.S_IMODE(ring.st_mode)) == (gid, 0o600)
    finally:
        d.kill()
    d = serve_real(tmp_path, config=f'[server]\nsocket_group = "{name}"\n[ring]\ngroup = "{name}"\n')
    try:  # the group alone, default modes
        assert os.stat(d.socket_path).st_gid == gid and stat.S_IMODE(os.stat(d.socket_path).st_mode) == 0o660
        assert os.stat(d.ring_path).st_gid == gid and stat.S_IMODE(os.stat(d.ring_path).st_mode) == 0o640
    finally:
        d.kill()


def test_the_uid_allow_list_refuses_other_uids(open_dir):
    me = os.getuid()
    allowed = NOBODY if IS_ROOT else me + 4242
    # 0666: only the allow-list stands between other uids and the daemon.
    d = serve_real(open_dir, config=f'[server]\nallowed_uids = [{allowed}]\nsocket_mode = "0666"\n', wait=False)
    try:
        d.wait_logged('"event": "ready"')  # health would be refused too
        with RawConn(d.socket_path) as raw:
            err = raw.recv()  # refused before it says anything
            assert isinstance(err, ErrorFrame) and err.code == "invalid_request"
            assert "allowed_uids" in err.message and f"uid {me}" in err.message
            assert raw.recv() is None
        if IS_ROOT:  # the uid it names gets in, from a real process of that uid
            assert as_uid(NOBODY, lambda: ask_health(d.socket_path)) == "health:ok"
        assert d.proc.poll() is None
    finally:
        d.kill()
