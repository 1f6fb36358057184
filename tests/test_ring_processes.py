"""The native ring across real processes: many readers, a slow one, restarts,
a killed producer, and backpressure readers (kept, evicted, closed).

Readers and writers in other processes are `python -c` children that talk
JSON lines on stdout; every wait is bounded.
"""

import os
import time

import numpy as np

from overlapd.kernels._native import RingReader, RingWriter
from ring_native_support import CAP, MASK64, assert_exact_cover, children, header  # noqa: F401 (children is a fixture)


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
