"""Feeds hostile frames to a live daemon and checks, frame by frame, that each
one is answered (or its connection closed) and that every accepted request
ends exactly once. Shared by tests/test_reliability_fuzz.py and bench/reliability.py.

In-band probes go over one persistent connection, each followed by a
`health` marker: everything the daemon says about the probe arrives before
the marker's answer. The daemon's own decoder is the oracle for what a body
*is* (an error, a query, a generate); the checks are about what comes back.
"""

from __future__ import annotations

import os
import socket
import time
from collections import Counter, deque
from pathlib import Path

from daemon_harness import RawConn
from hostile_frames import StreamProbe
from overlapd.daemon.protocol import (
    AbortFrame,
    AcceptedFrame,
    DoneFrame,
    ErrorFrame,
    FrameDecoder,
    GenerateFrame,
    HealthFrame,
    HealthQuery,
    StatsFrame,
    StatsQuery,
    TokensFrame,
    decode_client_frame,
    decode_daemon_frame,
    encode_raw_frame,
)

REFUSAL_CODES = frozenset({"invalid_request", "overloaded"})
STREAM_CODES = frozenset({"invalid_request", "overloaded", "too_large"})
WAIT_S = 30.0  # generous: a loaded 2-core CI machine; a hang still fails


class FuzzSession:
    """One persistent connection; `probe(body)` per hostile body, then `finish()`."""

    def __init__(self, path: Path | str, *, abort_every: int = 2) -> None:
        self.path = path
        self.conn = RawConn(path, timeout=WAIT_S)
        self.live: dict[str, int] = {}  # client id -> request_id, accepted and not ended
        self.ends: Counter[str] = Counter()  # kinds of end seen (done:<reason> / error:<code>)
        self.answers: Counter[str] = Counter()  # what the probes got
        self.accepted = 0
        self._abort_every = abort_every  # abort every n-th accepted request at once; the rest run to the end
        # the last probes and what came back for each, for the message of a failed check
        self.history: deque[list[str]] = deque(maxlen=8)

    def probe(self, body: bytes) -> None:
        expect = decode_client_frame(body)  # what the daemon will make of it
        self.history.append([f"probe {body[:60]!r} -> {_brief(expect)}"])
        self.conn.send_bytes(encode_raw_frame(body) + encode_raw_frame(b"\x81\xa4type\xa6health"))
        markers = 2 if isinstance(expect, HealthQuery) else 1
        answered = isinstance(expect, AbortFrame)  # an abort has no answer of its own
        frames: list[object] = []
        while markers:
            frame = self.conn.recv()
            assert frame is not None, f"the daemon closed the connection on an in-band frame {body[:80]!r}"
            if isinstance(frame, HealthFrame):
                markers -= 1
                if markers and isinstance(expect, HealthQuery):
                    answered = True
                continue
            frames.append(frame)
            self.history[-1].append(_brief(frame))
        # An error with the probe's id is its refusal, or the end of an earlier
        # live request under that id (a text prompt found too long once it was
        # encoded ends with invalid_request too): with an accepted frame for the
        # id, every such error is an end; without, the first is the refusal.
        accepted = {f.id for f in frames if isinstance(f, AcceptedFrame)}
        try:
            for frame in frames:
                if (not answered and isinstance(frame, ErrorFrame) and frame.id not in accepted
                        and self._is_refusal(frame, expect)):
                    assert frame.message, "an error frame without a message"
                    self.answers[f"error:{frame.code}"] += 1
                    answered = True
                    continue
                answered |= self._account(frame, expect)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\nlast probes, oldest first:\n{self._story()}") from None
        assert answered, f"no answer to {body[:80]!r} (decoded as {type(expect).__name__})\n{self._story()}"

    def _story(self) -> str:
        return "\n".join("  " + " | ".join(h) for h in self.history) + f"\n  live: {self.live}"

    def _account(self, frame: object, expect: object) -> bool:
        """Book one frame that is not the probe's refusal; True when it is the probe's own answer."""
        if isinstance(frame, StatsFrame):
            assert isinstance(expect, StatsQuery), "stats answer to a frame that did not ask"
            self.answers["stats"] += 1
            return True
        if isinstance(frame, AcceptedFrame):
            assert isinstance(expect, GenerateFrame) and frame.id == expect.id, f"unexpected {frame}"
            assert frame.id not in self.live, f"a second live request under id {frame.id!r}"
            self.live[frame.id] = frame.request_id
            self.accepted += 1
            self.answers["accepted"] += 1
            if self.accepted % self._abort_every == 0:
                self.conn.send({"type": "abort", "id": frame.id})
            return True
        if isinstance(frame, TokensFrame):
            assert frame.id in self.live, f"tokens for {frame.id!r}, which is not live"
            return False
        if isinstance(frame, DoneFrame):
            assert self.live.pop(frame.id, None) is not None, f"done for {frame.id!r}, which is not live"
            self.ends[f"done:{frame.finish_reason}"] += 1
            return False
        assert isinstance(frame, ErrorFrame), f"unexpected frame {frame!r}"
        assert frame.message, "an error frame without a message"
        # Not a refusal: it must end a live request (the engine failed on it, or its prompt was too long).
        assert frame.id in self.live, f"error {frame} belongs to no live request and to no probe"
        del self.live[frame.id]
        self.ends[f"error:{frame.code}"] += 1
        return False

    @staticmethod
    def _is_refusal(frame: ErrorFrame, expect: object) -> bool:
        if isinstance(expect, ErrorFrame):  # the decoder refused it: the same error, same id
            return frame.code == expect.code and frame.id == expect.id
        if isinstance(expect, GenerateFrame):  # refused by the server or engine: duplicate id, range, overload
            return frame.id == expect.id and frame.code in REFUSAL_CODES
        return False

    def finish(self, timeout: float = WAIT_S) -> None:
        """Abort what is still live, then wait until every accepted request has ended once."""
        for cid in list(self.live):
            self.conn.send({"type": "abort", "id": cid})
        deadline = time.monotonic() + timeout
        while self.live:
            assert time.monotonic() < deadline, f"requests never ended: {sorted(self.live)[:10]}"
            frame = self.conn.recv()
            assert frame is not None, "the daemon closed the connection while requests were live"
            if not isinstance(frame, HealthFrame):
                self._account(frame, None)
        self.conn.close()


def _brief(frame: object) -> str:
    fields = {k: getattr(frame, k) for k in ("id", "request_id", "code", "finish_reason") if hasattr(frame, k)}
    return f"{type(frame).__name__}{fields}"


def stream_probe(path: Path | str, probe: StreamProbe, counts: Counter[str] | None = None) -> None:
    """A fresh connection gets `probe`'s bytes; the daemon must answer with
    frames a client can decode, errors of the allowed codes only, and close."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(WAIT_S)
    try:
        sock.connect(os.fspath(path))
        try:
            for chunk in probe.chunks:
                sock.sendall(chunk)
            if not probe.oversized:
                sock.shutdown(socket.SHUT_WR)  # our EOF: the daemon must close its side too
        except (BrokenPipeError, ConnectionResetError):
            pass  # the daemon already hung up on an earlier oversized header: that is allowed
        frames = _read_to_eof(sock)
    finally:
        sock.close()
    errors = [f for f in frames if isinstance(f, ErrorFrame)]
    assert all(e.code in STREAM_CODES and e.message for e in errors), errors
    if probe.oversized:
        assert errors and errors[-1].code == "too_large", f"{probe.kind}: no too_large before the close: {frames[-3:]}"
    if counts is not None:
        counts[probe.kind] += 1
        counts["stream_errors"] += len(errors)


def _read_to_eof(sock: socket.socket) -> list[object]:
    dec = FrameDecoder(16 << 20)
    frames: list[object] = []
    deadline = time.monotonic() + WAIT_S
    while True:
        assert time.monotonic() < deadline, "the daemon never closed the connection"
        try:
            data = sock.recv(65536)
        except ConnectionResetError:
            return frames  # closed hard (abort): also a close
        if not data:
            return frames
        frames.extend(decode_daemon_frame(b) for b in dec.feed(data))


def fuzz_inband(session: FuzzSession, frames: int) -> int:
    """About `frames` hypothesis-drawn bodies through `session` (drawn in
    batches); returns how many were sent."""
    from hostile_frames import BATCH, inband_batches
    from hypothesis import HealthCheck, Phase, given, settings

    sent = 0

    # No shrinking: the session is one connection whose state every example
    # changes, so a replay after a failure meets the failed example's leftover
    # frames and reports those instead of the first failure.
    @given(inband_batches)
    @settings(max_examples=max(1, frames // BATCH), deadline=None, database=None,
              phases=(Phase.explicit, Phase.generate), suppress_health_check=list(HealthCheck))
    def batch(bodies: list[bytes]) -> None:
        nonlocal sent
        for body in bodies:
            session.probe(body)
        sent += len(bodies)

    batch()
    return sent


def fuzz_streams(path: Path | str, examples: int, max_frame: int, counts: Counter[str]) -> None:
    """`examples` hypothesis-drawn framing-level probes, each on a fresh connection."""
    from hostile_frames import stream_probes
    from hypothesis import HealthCheck, given, settings

    @given(stream_probes(max_frame))
    @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    def one(probe: StreamProbe) -> None:
        stream_probe(path, probe, counts)

    one()
