"""Reading the native ring in one process: lap detection with exact lost
ranges, epochs, the producer's clean close, readers closed from another thread.
"""

import os
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from overlapd.kernels._native import RingReader, RingWriter
from ring_native_support import CAP, assert_exact_cover, drain, header, records


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
