"""Helpers for the native ring tests (tests/test_ring_*.py): the header and
records parsed with struct at SPEC 1's offsets, the writer's body pattern,
and child processes that read or write a ring and report in JSON lines."""

import json
import os
import select
import signal
import struct
import subprocess
import sys
import time

import numpy as np
import pytest

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



def _valid_header(capacity=CAP, version=1, header_size=HDR, magic=b"OVLDRING"):
    h = bytearray(HDR)
    h[0:8] = magic
    struct.pack_into("<IIQQ", h, 8, version, header_size, capacity, 12345)
    return bytes(h)
