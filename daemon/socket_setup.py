"""Owning the daemon's socket file: bind with the right mode and group, never
steal a live daemon's socket, clean up only what is ours, and read the peer's
credentials.

Two daemons racing for one path are serialized by an flock on `<path>.lock`
(kept, never unlinked: unlinking a lock file reopens the race). A socket file
that nobody answers on is stale and replaced; one that answers belongs to a
live daemon and we refuse to start.
"""

from __future__ import annotations

import errno
import fcntl
import grp
import os
import socket
import stat
import struct
from dataclasses import dataclass
from typing import Final, NamedTuple

PROBE_TIMEOUT_S: Final = 1.0


class SocketSetupError(RuntimeError):
    """The socket path cannot be used; the message says what to do."""


class SocketInUse(SocketSetupError):
    """Another live daemon owns the socket path."""


class PeerCredentials(NamedTuple):
    pid: int
    uid: int
    gid: int


def peer_credentials(sock: socket.socket) -> PeerCredentials | None:
    """SO_PEERCRED of a connected AF_UNIX socket (what the kernel vouches for)."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except (OSError, AttributeError):
        return None
    pid, uid, gid = struct.unpack("3i", raw)
    return PeerCredentials(pid, uid, gid)


def resolve_gid(group: str | int) -> int:
    if isinstance(group, int):
        return group
    if group.isdigit():
        return int(group)
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise SocketSetupError(
            f"Group {group!r} ([server] socket_group) does not exist; create it (groupadd {group}) "
            "or set socket_group to an existing group."
        ) from None


@dataclass
class BoundSocket:
    """A socket we bound at `path`; `release()` undoes exactly that."""

    sock: socket.socket
    path: str
    identity: tuple[int, int]  # (st_dev, st_ino) of the file we created
    lock_fd: int

    def release(self) -> None:
        """Close, and unlink the socket file if it is still the one we created
        (a successor daemon may already have replaced it)."""
        try:
            self.sock.close()
        finally:
            try:
                st = os.lstat(self.path)
                if (st.st_dev, st.st_ino) == self.identity:
                    os.unlink(self.path)
            except OSError:
                pass
            if self.lock_fd >= 0:
                os.close(self.lock_fd)
                self.lock_fd = -1


def _check_parent(path: str) -> None:
    parent = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(parent, mode=0o755, exist_ok=True)
        st = os.stat(parent)
    except OSError as exc:
        raise SocketSetupError(f"Cannot create the socket's directory {parent}: {exc.strerror}.") from None
    if not stat.S_ISDIR(st.st_mode):
        raise SocketSetupError(f"{parent} is not a directory; choose another socket_path.")
    if st.st_uid not in (os.getuid(), 0):
        # e.g. /tmp/overlapd-1000 pre-created by another user to catch our socket.
        raise SocketSetupError(
            f"{parent} belongs to uid {st.st_uid}, not to this user or root; remove it or choose another socket_path."
        )


def _take_lock(path: str) -> int:
    lock_path = path + ".lock"
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    except OSError as exc:
        raise SocketSetupError(f"Cannot open the lock file {lock_path}: {exc.strerror}.") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise SocketInUse(
            f"Another overlapd is starting or running on {path} (it holds {lock_path}); "
            "stop it first or choose another socket_path."
        ) from None
    return fd


def probe(path: str, timeout_s: float = PROBE_TIMEOUT_S) -> bool:
    """True when something accepts connections at `path`."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    s.settimeout(timeout_s)
    try:
        s.connect(path)
        return True
    except TimeoutError:
        return True  # a full backlog is a live, busy daemon
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except OSError as exc:
        raise SocketSetupError(f"Cannot tell whether {path} is in use: {exc.strerror}.") from None
    finally:
        s.close()


def _remove_stale(path: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise SocketSetupError(f"{path} exists and is not a socket; remove it or choose another socket_path.")
    if probe(path):
        raise SocketInUse(
            f"Another daemon answers on {path}; stop it (e.g. systemctl stop overlapd) or choose another socket_path."
        )
    os.unlink(path)


def bind_unix_socket(path: str, *, mode: int = 0o660, group: str | int | None = None) -> BoundSocket:
    """Bind (not yet listen) a stream socket at `path` with `mode` and `group`.

    Nobody can connect before listen(), which asyncio calls after this, so the
    moment between bind and chmod exposes nothing.
    """
    if len(os.fsencode(path)) > 107:
        raise SocketSetupError(f"Socket path {path} is longer than the 107 bytes unix sockets allow.")
    _check_parent(path)
    lock_fd = _take_lock(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    bound = False
    try:
        _remove_stale(path)
        try:
            sock.bind(path)
            bound = True
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise SocketInUse(f"{path} was taken while this daemon was starting; is another starting?") from None
            raise SocketSetupError(f"Cannot bind {path}: {exc.strerror}.") from None
        os.chmod(path, mode)
        if group is not None:
            gid = resolve_gid(group)
            try:
                os.chown(path, -1, gid)
            except PermissionError:
                raise SocketSetupError(
                    f"Cannot give {path} to group {group}: only root or a member of that group may; "
                    "run the daemon as such a user or drop socket_group."
                ) from None
        st = os.lstat(path)
    except BaseException:
        sock.close()
        if bound:
            os.unlink(path)
        os.close(lock_fd)
        raise
    return BoundSocket(sock, path, (st.st_dev, st.st_ino), lock_fd)
