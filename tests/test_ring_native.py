"""The native shared-memory ring (SPEC.md section 1): layout to the byte,
lap detection, epochs, producer death, backpressure, bad input.

Real processes, no mocks. Readers and writers in other processes are
`python -c` children that talk JSON lines on stdout; every wait is bounded.
"""

import json
import os
import select
import signal
import stat
import struct
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from overlapd.kernels._native import RingError, RingReader, RingWriter

CAP = 65536
HDR = 8192
MASK64 = (1 << 64) - 1


# ---------------------------------------------------------------- helpers


def header(path):
    """The header fields, parsed with struct at the offsets SPEC 1.1 gives."""
    with open(path, "rb") as f:
        b = f.read(HDR)
    u32 = lambda off: struct.unpack_from("<I", b, off)[0]
    u64 = lambda off: struct.unpack_from("<Q", b, off)[0]
    return {
        "magic": b[0:8],
        "version": u32(8),
        "header_size": u32(12),
        "capacity": u64(16),
        "epoch": u64(24),
        "pid": u32(32),
        "flags": u32(36),
        "max_slots": u32(40),
        "vocab_size": u32(44),
        "reserved": b[48:64],
        "tail": u64(64),
        "tail_intent": u64(128),
        "head": u64(192),
        "notify": u32(256),
        "waiters": u32(260),
        "heartbeat_ns": u64(320),
        "model_name": b[384:640],
        "slots": [struct.unpack_from("<QII", b, 4096 + 64 * i) for i in range(64)],
    }


def records(path):
    """Walks the data region from head to tail: (pos, length, type, seq, publish_ns, body)."""
    h = header(path)
    cap = h["capacity"]
    with open(path, "rb") as f:
        f.seek(HDR)
        data = f.read(cap)
    out, pos = [], h["head"]
    while pos < h["tail"]:
        off = pos % cap
        length, rtype = struct.unpack_from("<IH", data, off)
        assert length >= 8 and length % 8 == 0, (pos, length)
        assert off + length <= cap, f"record at {pos} wraps"
        if length >= 24:
            reserved, seq, pns = struct.unpack_from("<HQQ", data, off + 6)
            assert reserved == 0
        else:
            assert rtype == 0, "only a PAD may be shorter than the record header"
            seq = pns = None
        out.append((pos, length, rtype, seq, pns, data[off + 24 : off + length]))
        pos += length
    assert pos == h["tail"]
    return out


def pattern_ok(seq, body):
    """Python-level twin of RingWriter::bench_word: each u64 word depends on seq."""
    words = np.frombuffer(body, dtype="<u8")
    if words.size == 0:
        return True
    a = np.uint64(((seq + 1) * 0x9E3779B97F4A7C15) & MASK64)
    idx = (np.arange(1, words.size + 1, dtype=np.uint64) * np.uint64(0xC2B2AE3D27D4EB4F))
    return bool(np.array_equal(words, a ^ idx))


CHILD = r"""
import json, os, sys, time
import numpy as np
from overlapd.kernels._native import RingReader, RingWriter
MASK64 = (1 << 64) - 1
def pattern_ok(seq, body):
    w = np.frombuffer(body, dtype="<u8")
    a = np.uint64(((seq + 1) * 0x9E3779B97F4A7C15) & MASK64)
    return bool(np.array_equal(w, a ^ (np.arange(1, w.size + 1, dtype=np.uint64) * np.uint64(0xC2B2AE3D27D4EB4F))))
def say(**kw):
    print(json.dumps(kw), flush=True)
a = json.loads(sys.argv[1])
role = a["role"]
if role == "writer":                      # publish a few, then heartbeat until killed
    w = RingWriter(a["path"], a.get("capacity", 65536))
    for i in range(a.get("records", 0)):
        w.publish(b"r" * 16)
    say(ready=True, epoch=w.epoch, pid=os.getpid())
    while True:
        w.heartbeat(); time.sleep(0.05)
r = RingReader(a["path"], from_head=a.get("from_head", False),
               backpressure=a.get("backpressure", False), stale_after_ms=a.get("stale_ms", 3000))
say(ready=True, epoch=r.epoch, pid=os.getpid())
if role == "hold":                        # claim a slot and never read
    time.sleep(60)
elif role == "bench":
    res = r.bench_consume(a["count"], a["timeout_ms"], True)
    res["latency_n"] = int(res.pop("latency_ns").size)
    say(**res)
elif role == "collect":                   # Python loop: every seq, every lost range, bodies checked
    seqs, lost, events, torn = [], [], [], 0
    deadline = time.monotonic() + a["timeout_s"]
    while time.monotonic() < deadline:
        ev = r.next(100)
        if ev[0] == "record":
            seqs.append(ev[1])
            torn += not pattern_ok(ev[1], ev[4])
            if a.get("sleep_every") and len(seqs) % a["sleep_every"] == 0:
                time.sleep(a["sleep_s"])
        elif ev[0] == "lost":
            lost.append([ev[1], ev[2]])
        elif ev[0] != "timeout":
            events.append([ev[0], time.monotonic()] + list(ev[1:]))
            if a.get("print_events"):
                say(event=ev[0], t=time.monotonic(), args=list(ev[1:]))
            if ev[0] in a.get("stop_on", ["closed"]):
                break
    say(seqs=seqs, lost=lost, events=events, torn=torn, lost_total=r.lost_total)
"""


class Child:
    """A python child process running CHILD with JSON args; reads its JSON lines with timeouts."""

    def __init__(self, **args):
        self.p = subprocess.Popen(
            [sys.executable, "-c", CHILD, json.dumps(args)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self._buf = b""

    def line(self, timeout=10.0):
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"child said nothing in {timeout}s; stderr: {self._stderr()}")
            ready, _, _ = select.select([self.p.stdout], [], [], left)
            if ready:
                chunk = os.read(self.p.stdout.fileno(), 1 << 20)
                if not chunk:
                    raise EOFError(f"child exited ({self.p.poll()}); stderr: {self._stderr()}")
                self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    def _stderr(self):
        if self.p.poll() is None:
            return "(still running)"
        return self.p.stderr.read().decode(errors="replace")[-2000:]

    def kill(self):
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGKILL)
        self.p.wait(timeout=10)

    def close(self):
        self.kill()
        self.p.stdout.close()
        self.p.stderr.close()


@pytest.fixture
def children():
    made = []

    def spawn(**args):
        c = Child(**args)
        made.append(c)
        return c

    yield spawn
    for c in made:
        c.close()


def drain(reader, timeout_ms=200):
    """Reads until a timeout; returns (records, other events)."""
    recs, other = [], []
    while True:
        ev = reader.next(timeout_ms)
        if ev[0] == "timeout":
            return recs, other
        (recs if ev[0] == "record" else other).append(ev)


def assert_exact_cover(seqs, lost, total, start=0):
    """received seqs and lost ranges partition range(start, total) exactly."""
    covered = list(seqs)
    for first, last in lost:
        assert first <= last
        covered.extend(range(first, last + 1))
    assert sorted(covered) == list(range(start, total)), "received and lost must cover every seq exactly once"


# ---------------------------------------------------------------- layout


def test_header_fields_at_spec_offsets(tmp_path):
    path = tmp_path / "ring"
    w = RingWriter(str(path), CAP, max_slots=48, vocab_size=32000, model_name="tiny-llama-β")
    h = header(path)
    assert os.path.getsize(path) == HDR + CAP
    assert h["magic"] == b"OVLDRING"
    assert (h["version"], h["header_size"], h["capacity"]) == (1, 8192, CAP)
    assert h["epoch"] != 0 and h["epoch"] == w.epoch
    assert h["pid"] == os.getpid()
    assert h["flags"] == 0
    assert (h["max_slots"], h["vocab_size"]) == (48, 32000)
    assert h["reserved"] == bytes(16)
    assert (h["tail"], h["tail_intent"], h["head"]) == (0, 0, 0)
    assert h["waiters"] == 0
    assert 0 < time.monotonic_ns() - h["heartbeat_ns"] < 5e9
    name = "tiny-llama-β".encode()
    assert h["model_name"] == name + bytes(256 - len(name))
    assert all(s == (0, 0, 0) for s in h["slots"])

    seq = w.publish(b"x" * 40)
    h = header(path)
    assert seq == 0 and h["tail"] == h["tail_intent"] == 64 and h["head"] == 0
    assert h["notify"] >= 1
    w.close()
    assert header(path)["flags"] == 1

    # a second producer gets a different nonzero epoch, re-initialising in place
    w2 = RingWriter(str(path), CAP)
    h2 = header(path)
    assert h2["epoch"] not in (0, h["epoch"]) and h2["flags"] == 0 and h2["tail"] == 0
    w2.close()


@pytest.mark.parametrize("mode,umask", [(0o640, 0o077), (0o600, 0o000), (0o644, 0o022)])
def test_mode_is_exact_whatever_the_umask(tmp_path, mode, umask):
    old = os.umask(umask)
    try:
        w = RingWriter(str(tmp_path / "ring"), CAP, mode=mode)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "ring").st_mode) == mode
    w.close()


def test_record_header_fields_and_alignment(tmp_path):
    path = tmp_path / "ring"
    w = RingWriter(str(path), CAP)
    t0 = time.monotonic_ns()
    lengths = [0, 1, 7, 8, 9, 100, 4096]
    for i, n in enumerate(lengths):
        assert w.publish(bytes([i + 1]) * n) == i
    view = w.try_reserve(13)
    assert len(view) == 16 and bytes(view[13:]) == bytes(3)  # pad zeroed
    view[:13] = b"reserved-body"
    assert w.commit() == len(lengths)
    t1 = time.monotonic_ns()

    recs = records(path)
    assert [r[3] for r in recs] == list(range(len(lengths) + 1))
    pos = 0
    for (p, length, rtype, seq, pns, body), n in zip(recs, lengths + [13]):
        assert p == pos and p % 8 == 0
        assert length == 24 + (n + 7) // 8 * 8
        assert rtype == 1
        assert t0 <= pns <= t1
        expect = b"reserved-body" if seq == len(lengths) else bytes([seq + 1]) * n
        assert body == expect + bytes(len(body) - n)
        pos += length
    assert w.tail == pos == header(path)["tail"]
    assert w.next_seq == len(lengths) + 1
    w.close()


@pytest.mark.parametrize("pad", [8, 16, 24, 104])
def test_pad_at_the_end_of_the_data_region(tmp_path, pad):
    """A record that does not fit before the end is preceded by a PAD over the
    rest; an 8- or 16-byte PAD is only length and type."""
    path = tmp_path / "ring"
    w = RingWriter(str(path), CAP)
    r = RingReader(str(path), from_head=True)
    for _ in range(63):
        w.publish(b"a" * 1000)  # 1024-byte records
    w.publish(b"b" * (1024 - pad - 24))  # now tail == CAP - pad
    assert w.tail == CAP - pad
    last = w.publish(b"c" * 200)  # 224 bytes: does not fit in `pad`
    h = header(path)
    assert h["tail"] == h["tail_intent"] == CAP + 224
    assert h["head"] == 1024, "the record at position 0 was overwritten"
    with open(path, "rb") as f:
        f.seek(HDR + CAP - pad)
        raw = f.read(pad)
        f.seek(HDR)
        first = f.read(24)
    assert struct.unpack_from("<IH", raw) == (pad, 0)
    if pad >= 24:
        assert struct.unpack_from("<HQQ", raw, 6) == (0, 0, 0)
    assert struct.unpack_from("<IHHQ", first) == (224, 1, 0, last)
    recs = records(path)
    assert recs[-2][1:3] == (pad, 0) and recs[-1][3] == last

    got, other = drain(r, 50)
    assert other == [("lost", 0, 0)], "the reader opened at seq 0, which was overwritten"
    assert [e[1] for e in got] == list(range(1, last + 1))
    assert got[-1][4] == b"c" * 200
    w.close()
    r.close()


def test_head_tracks_oldest_intact_record(tmp_path):
    path = tmp_path / "ring"
    w = RingWriter(str(path), CAP)
    for i in range(3000):
        w.publish(bytes(8 * (i % 50)))
        if i % 97 == 0:
            h = header(path)
            assert h["tail"] - h["head"] <= CAP
            assert h["tail_intent"] - h["head"] <= CAP  # nothing before head is intact, all after is
            recs = records(path)  # walking from head must land exactly on tail
            assert recs[-1][3] == i
    w.close()


# ---------------------------------------------------------------- writer API


def test_writer_argument_and_state_errors(tmp_path):
    p = str(tmp_path / "ring")
    for cap in (0, 1000, 65537, 32768, 3 * 65536):
        with pytest.raises(ValueError, match="power of two"):
            RingWriter(p, cap)
    with pytest.raises(ValueError, match="255"):
        RingWriter(p, CAP, model_name="m" * 256)
    w = RingWriter(p, CAP, model_name="m" * 255)
    assert w.max_record_bytes == CAP // 2
    with pytest.raises(ValueError, match="too large"):
        w.try_reserve(CAP // 2)
    with pytest.raises(ValueError, match="too large"):
        w.publish(bytes(CAP))
    assert w.publish(bytes(CAP // 2 - 24)) == 0  # the largest record fits
    with pytest.raises(RuntimeError, match="no reservation"):
        w.commit()
    view = w.try_reserve(8)
    with pytest.raises(RuntimeError, match="already open"):
        w.try_reserve(8)
    w.cancel()
    assert w.publish(b"ok") == 1, "a cancelled reservation does not use up a seq"
    stale = w.try_reserve(64)
    w.close()
    stale[:4] = b"late"  # the mapping outlives close while a view holds it: no crash
    with pytest.raises(RuntimeError, match="closed"):
        w.publish(b"x")
    with pytest.raises(RuntimeError, match="closed"):
        w.try_reserve(8)
    w.close()  # idempotent
    w.heartbeat()  # harmless after close
    del view, stale


def test_second_writer_on_a_live_ring_is_refused(tmp_path, children):
    p = str(tmp_path / "ring")
    w = RingWriter(p, CAP)
    with pytest.raises(RingError, match="another RingWriter in this process"):
        RingWriter(p, CAP)
    with pytest.raises(RingError, match="another RingWriter in this process"):
        RingWriter(p, 2 * CAP)
    w.close()
    RingWriter(p, CAP).close()

    other = str(tmp_path / "other")
    c = children(role="writer", path=other)
    pid = c.line()["pid"]
    with pytest.raises(RingError, match=f"live producer \\(pid {pid}\\)"):
        RingWriter(other, CAP)
    c.kill()
    RingWriter(other, CAP).close()  # a dead producer's ring may be taken over


# ---------------------------------------------------------------- reading


def test_lapped_reader_reports_the_exact_lost_range(tmp_path):
    p = str(tmp_path / "ring")
    w = RingWriter(p, CAP)
    r = RingReader(p)
    for _ in range(5):
        w.publish(bytes(100))
    assert [r.next(0)[1] for _ in range(2)] == [0, 1]
    for _ in range(3000):  # laps the reader several times
        w.publish(bytes(100))
    first = r.next(0)
    assert first[0] == "lost" and first[1] == 2
    nxt = r.next(0)
    assert nxt[0] == "record" and nxt[1] == first[2] + 1, "the record after the gap comes next"
    recs, other = drain(r, 20)
    assert other == []
    seqs = [0, 1, nxt[1]] + [e[1] for e in recs]
    assert_exact_cover(seqs, [first[1:]], 3005)
    assert r.lost_total == first[2] - first[1] + 1
    assert r.cursor == r.tail == w.tail
    w.close()


def test_reader_starting_at_tail_learns_the_next_seq(tmp_path):
    """A reader that joins live and is lapped before its first record still
    reports an exact range (it learnt the next seq by walking head..tail)."""
    p = str(tmp_path / "ring")
    w = RingWriter(p, CAP)
    for _ in range(700):
        w.publish(bytes(100))
    r = RingReader(p)
    assert r.cursor == w.tail
    for _ in range(2000):
        w.publish(bytes(100))
    ev = r.next(0)
    assert ev[0] == "lost" and ev[1] == 700
    recs, _ = drain(r, 20)
    assert recs[0][1] == ev[2] + 1
    assert_exact_cover([e[1] for e in recs], [ev[1:]], 2700, start=700)
    w.close()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(st.one_of(st.tuples(st.just("pub"), st.integers(0, 20000)),
                              st.tuples(st.just("read"), st.integers(1, 50))), max_size=120))
def test_any_interleaving_delivers_intact_bodies_and_exact_losses(tmp_path, ops):
    p = str(tmp_path / "ring")
    w = RingWriter(p, CAP)
    r = RingReader(p)
    bodies, seqs, lost = {}, [], []

    def handle(ev):
        if ev[0] == "record":
            body = bodies[ev[1]]
            assert ev[4] == body + bytes(-len(body) % 8)
            seqs.append(ev[1])
        else:
            assert ev[0] == "lost" and (not seqs or ev[1] > seqs[-1])
            lost.append(ev[1:])

    for op, n in ops:
        if op == "pub":
            seq = w.next_seq
            bodies[seq] = seq.to_bytes(8, "little") * (n // 8) + b"z" * (n % 8)
            assert w.publish(bodies[seq]) == seq
        else:
            for _ in range(n):
                ev = r.next(0)
                if ev[0] == "timeout":
                    break
                handle(ev)
    while (ev := r.next(0))[0] != "timeout":
        handle(ev)
    assert_exact_cover(seqs, lost, w.next_seq)
    assert r.lost_total == w.next_seq - len(seqs)
    if w.next_seq:
        records(p)  # head..tail walks cleanly
    w.close()
    r.close()


def test_record_larger_than_the_initial_buffer(tmp_path):
    p = str(tmp_path / "ring")
    w = RingWriter(p, 4 * CAP)
    r = RingReader(p)
    body = os.urandom(100_000)
    w.publish(body)
    w.publish(b"small")
    ev = r.next(1000)
    assert ev[:2] == ("record", 0) and ev[4] == body
    assert r.next(1000)[4][:5] == b"small"
    w.close()


def test_epoch_change_in_place_and_by_replacement(tmp_path):
    p = str(tmp_path / "ring")
    w = RingWriter(p, CAP, model_name="a")
    r = RingReader(p, from_head=True)
    w.publish(b"old")
    assert r.next(100)[1] == 0
    w.close(clean=False)
    w = RingWriter(p, CAP, model_name="b")  # same size: re-initialised in place
    assert r.next(100) == ("epoch", w.epoch)
    assert r.model_name == "b"
    w.publish(b"new")
    ev = r.next(100)
    assert ev[:2] == ("record", 0) and ev[4][:3] == b"new"

    w.close(clean=False)
    w = RingWriter(p, 2 * CAP)  # different size: a new file renamed over the path
    t0 = time.monotonic()
    ev = r.next(2000)
    assert ev == ("epoch", w.epoch) and time.monotonic() - t0 < 1.0
    assert r.capacity == 2 * CAP
    w.publish(b"newer")
    ev = r.next(500)
    assert ev[:2] == ("record", 0) and ev[4][:5] == b"newer"
    w.close()
    assert r.next(500) == ("closed",)
    r.close()
    with pytest.raises(ValueError, match="closed"):
        r.next(0)


def test_records_of_a_new_epoch_skipped_by_the_resync_are_reported_lost(tmp_path):
    """SPEC 1.4.5: on an epoch change the reader resyncs at tail. The new
    epoch's seqs start at 0, so what it skipped shows as an exact loss."""
    p = str(tmp_path / "ring")
    w = RingWriter(p, CAP)
    r = RingReader(p)
    w.close(clean=False)
    w = RingWriter(p, CAP)
    for _ in range(3):
        w.publish(b"before the reader looked")
    assert r.next(100) == ("epoch", w.epoch)
    assert r.next(0) == ("timeout",)
    w.publish(b"after")
    assert r.next(100) == ("lost", 0, 2)
    assert r.next(100)[:2] == ("record", 3)
    w.close()


def test_clean_close_is_reported_once_after_everything_was_read(tmp_path):
    p = str(tmp_path / "ring")
    w = RingWriter(p, CAP)
    r = RingReader(p)
    w.publish(b"1")
    w.publish(b"2")
    w.close()
    assert r.closed_cleanly
    assert [r.next(100)[0] for _ in range(3)] == ["record", "record", "closed"]
    assert r.next(150) == ("timeout",)


def test_reader_close_from_another_thread_ends_a_blocking_next(tmp_path):
    p = str(tmp_path / "ring")
    w = RingWriter(p, CAP)
    r = RingReader(p)
    out = []
    t = threading.Thread(target=lambda: out.append(r.next(-1)))
    t.start()
    time.sleep(0.2)
    r.close()
    t.join(timeout=2)
    assert not t.is_alive() and out == [("timeout",)]
    w.close()


def test_strict_readonly_reader_polls(tmp_path):
    p = str(tmp_path / "ring")
    w = RingWriter(p, CAP)
    r = RingReader(p, strict_readonly=True)
    got = []
    t = threading.Thread(target=lambda: got.append(r.next(3000)))
    t.start()
    time.sleep(0.05)
    w.publish(b"hi")
    t.join(timeout=5)
    assert got and got[0][:2] == ("record", 0)
    assert header(p)["waiters"] == 0
    w.close()


# ---------------------------------------------------------------- processes


def test_many_readers_one_slow_never_torn_exact_losses(tmp_path, children):
    p = str(tmp_path / "ring")
    n = 20000
    w = RingWriter(p, CAP)
    fast = [children(role="bench", path=p, from_head=True, count=n, timeout_ms=20000) for _ in range(2)]
    slow = children(role="collect", path=p, from_head=True, timeout_s=20, sleep_every=50, sleep_s=0.002)
    for c in fast + [slow]:
        assert c.line()["ready"]
    assert w.bench_publish(n, 200, interval_ns=2000) == n
    w.close()

    res = slow.line(timeout=30)
    assert res["torn"] == 0
    assert res["lost"], "the slow reader was expected to be lapped"
    assert_exact_cover(res["seqs"], res["lost"], n)
    assert res["lost_total"] == n - len(res["seqs"])
    assert res["events"][-1][0] == "closed"
    for c in fast:
        r = c.line(timeout=30)
        assert r["torn"] == 0
        assert r["received"] + r["lost"] == n
        assert r["latency_n"] == r["received"] > 0


def test_big_records_overwritten_mid_copy_are_never_delivered(tmp_path, children):
    """16 KB records in a 64 KB ring: a reader's copy is often overwritten
    while it is being made. tail_intent must catch every such copy (with the
    check disabled this test sees torn bodies)."""
    p = str(tmp_path / "ring")
    n = 10000
    w = RingWriter(p, CAP)
    readers = [children(role="bench", path=p, from_head=True, count=n, timeout_ms=20000) for _ in range(3)]
    for c in readers:
        c.line()
    assert w.bench_publish(n, 16000) == n
    w.close()
    for c in readers:
        r = c.line(timeout=30)
        assert r["torn"] == 0
        assert r["received"] + r["lost"] == n and r["received"] > 0


def test_restart_is_seen_as_a_new_epoch_within_a_second(tmp_path, children):
    p = str(tmp_path / "ring")
    w1 = children(role="writer", path=p, records=3)
    e1 = w1.line()["epoch"]
    rd = children(role="collect", path=p, from_head=True, timeout_s=20, print_events=True,
                  stop_on=["epoch"], stale_ms=10000)
    assert rd.line()["epoch"] == e1
    time.sleep(0.2)
    w1.kill()  # crash ...
    t0 = time.monotonic()
    w2 = RingWriter(p, CAP)  # ... and restart (same size: re-initialised in place)
    ev = rd.line(timeout=5)
    assert ev["event"] == "epoch" and ev["args"] == [w2.epoch]
    assert ev["t"] - t0 < 1.0
    res = rd.line()
    assert res["seqs"] == [0, 1, 2] and res["lost"] == []
    w2.close()


def test_restart_with_another_capacity_is_seen_within_a_second(tmp_path, children):
    p = str(tmp_path / "ring")
    w1 = children(role="writer", path=p)
    w1.line()
    rd = children(role="collect", path=p, timeout_s=20, print_events=True, stop_on=["epoch"])
    rd.line()
    time.sleep(0.2)
    w1.kill()
    t0 = time.monotonic()
    w2 = RingWriter(p, 4 * CAP)
    ev = rd.line(timeout=5)
    assert ev["event"] == "epoch" and ev["args"] == [w2.epoch]
    assert ev["t"] - t0 < 1.0
    w2.close()


def test_killed_producer_is_reported_gone(tmp_path, children):
    p = str(tmp_path / "ring")
    wc = children(role="writer", path=p, records=3)
    wc.line()
    r = RingReader(p, from_head=True, stale_after_ms=1000)
    assert [r.next(500)[1] for _ in range(3)] == [0, 1, 2]
    assert r.next(1200) == ("timeout",), "a heartbeating idle producer is not gone"
    wc.kill()
    t0 = time.monotonic()
    assert r.next(5000) == ("gone",)
    assert time.monotonic() - t0 < 2.5
    assert not r.closed_cleanly and r.heartbeat_age_ns > 1e9
    assert r.next(300) == ("timeout",), "gone is reported once"
    w = RingWriter(p, CAP)  # the dead producer's ring is taken over
    assert r.next(500) == ("epoch", w.epoch)
    w.close()


# ---------------------------------------------------------------- backpressure


def test_backpressure_reader_loses_nothing(tmp_path, children):
    p = str(tmp_path / "ring")
    w = RingWriter(p, CAP, backpressure=True)
    rd = children(role="collect", path=p, backpressure=True, timeout_s=30, sleep_every=20, sleep_s=0.005)
    rd.line()
    assert w.active_readers() == 1
    slot = [s for s in header(p)["slots"] if s[2] == 1]
    assert len(slot) == 1 and slot[0][1] == rd.p.pid

    blocked, seq = 0, 0
    deadline = time.monotonic() + 20
    while seq < 1500 and time.monotonic() < deadline:
        body = np.array([((seq + 1) * 0x9E3779B97F4A7C15) & MASK64], dtype=np.uint64)
        words = body ^ (np.arange(1, 61, dtype=np.uint64) * np.uint64(0xC2B2AE3D27D4EB4F))
        got = w.publish(words.tobytes())  # 480-byte body, 504-byte record
        if got == -1:
            blocked += 1
            time.sleep(0.001)
            continue
        assert got == seq
        seq += 1
    assert seq == 1500 and blocked > 0, "the slow reader should have held the writer back"
    assert w.bench_publish(3000, 200, stop_after_ns=20_000_000_000) == 3000
    w.close()
    res = rd.line(timeout=40)
    assert res["lost"] == [] and res["torn"] == 0
    assert res["seqs"] == list(range(4500))


def test_killed_backpressure_reader_is_evicted(tmp_path, children):
    p = str(tmp_path / "ring")
    w = RingWriter(p, CAP, backpressure=True)
    hold = children(role="hold", path=p, backpressure=True)
    hold.line()
    assert w.active_readers() == 1
    published = 0
    while w.publish(bytes(1000)) != -1:
        published += 1
        assert published < 100
    assert published >= 60  # about one capacity's worth
    assert w.publish(bytes(1000)) == -1
    hold.kill()  # SIGKILL and reap it (a zombie still counts as alive)
    assert w.publish(bytes(1000)) == published, "the dead reader's slot is freed and the writer proceeds"
    assert w.active_readers() == 0
    assert w.readers_evicted() == 1  # freed by the writer itself while publishing

    hold2 = children(role="hold", path=p, backpressure=True)
    hold2.line()
    assert w.active_readers() == 1 and w.evict_dead_readers() == 0
    hold2.kill()
    assert w.evict_dead_readers() == 1 and w.active_readers() == 0
    assert w.readers_evicted() == 2
    w.close()


def test_backpressure_reader_frees_its_slot_on_close(tmp_path):
    p = str(tmp_path / "ring")
    w = RingWriter(p, CAP, backpressure=True)
    r = RingReader(p, backpressure=True)
    assert w.active_readers() == 1
    w.publish(b"abc")
    assert r.next(100)[1] == 0
    slot = [s for s in header(p)["slots"] if s[2] == 1][0]
    assert slot == (w.tail, os.getpid(), 1), "the cursor is published after every record"
    r.close()
    assert w.active_readers() == 0
    w.close()


# ---------------------------------------------------------------- bad input


def _valid_header(capacity=CAP, version=1, header_size=HDR, magic=b"OVLDRING"):
    h = bytearray(HDR)
    h[0:8] = magic
    struct.pack_into("<IIQQ", h, 8, version, header_size, capacity, 12345)
    return bytes(h)


@pytest.mark.parametrize(
    "name,content,message",
    [
        ("empty", b"", "empty"),
        ("short", b"x" * 100, "too small"),
        ("text", b"hello world\n" * 1000, "bad magic"),
        ("version", _valid_header(version=2) + bytes(CAP), "version 2 is not supported"),
        ("header_size", _valid_header(header_size=4096) + bytes(CAP), "header_size"),
        ("capacity", _valid_header(capacity=70000) + bytes(70000), "capacity"),
        ("small_capacity", _valid_header(capacity=4096) + bytes(4096), "capacity"),
        ("truncated", _valid_header() + bytes(1000), "truncated"),
    ],
)
def test_bad_files_raise_ring_error(tmp_path, name, content, message):
    p = tmp_path / name
    p.write_bytes(content)
    for bp in (False, True):
        with pytest.raises(RingError, match=message):
            RingReader(str(p), backpressure=bp)


def test_bad_paths_raise_ring_error(tmp_path):
    with pytest.raises(RingError, match="no such file"):
        RingReader(str(tmp_path / "missing"))
    with pytest.raises(RingError, match="directory"):
        RingReader(str(tmp_path))
    with pytest.raises(RingError, match="directory"):
        RingReader(str(tmp_path), backpressure=True)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    t0 = time.monotonic()
    with pytest.raises(RingError, match="not a regular file"):
        RingReader(str(fifo))
    assert time.monotonic() - t0 < 1.0
    assert issubclass(RingError, OSError)
    with pytest.raises(RingError):
        RingWriter(str(tmp_path), CAP)  # a directory is not a ring file
    with pytest.raises(RingError):
        RingWriter(str(tmp_path / "no" / "such" / "dir"), CAP)


@pytest.mark.parametrize("seed", range(5))
def test_garbage_in_a_valid_header_never_crashes_a_reader(tmp_path, seed):
    """Positions and records that make no sense are reported, never followed
    out of bounds."""
    rng = np.random.default_rng(seed)
    hdr = bytearray(_valid_header())
    tail = int(rng.integers(1, 4 * CAP)) // 8 * 8
    head = int(rng.integers(0, tail + 1)) // 8 * 8
    struct.pack_into("<Q", hdr, 64, tail)
    struct.pack_into("<Q", hdr, 128, tail + int(rng.integers(0, 2)) * 8)
    struct.pack_into("<Q", hdr, 192, head)
    struct.pack_into("<Q", hdr, 320, time.monotonic_ns())
    data = bytearray(rng.integers(0, 256, CAP, dtype=np.uint8).tobytes())
    for off in rng.integers(0, CAP // 8, 200) * 8:  # sprinkle plausible-looking lengths
        struct.pack_into("<IH", data, int(off), int(rng.integers(0, 64)) * 8, int(rng.integers(0, 3)))
    path = tmp_path / "garbage"
    path.write_bytes(bytes(hdr) + bytes(data))
    for from_head in (False, True):
        r = RingReader(str(path), from_head=from_head, stale_after_ms=100_000)
        for _ in range(200):
            try:
                ev = r.next(0)
            except RingError as e:
                assert "malformed" in str(e)
                continue
            if ev[0] == "timeout":
                break
            assert ev[0] in ("record", "lost")
        r.close()
