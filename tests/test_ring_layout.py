"""The native shared-memory ring (SPEC.md section 1), to the byte: header and
record layout, the writer's API and state errors, files that are not rings.
"""

import os
import stat
import struct
import time

import numpy as np
import pytest

from overlapd.kernels._native import RingError, RingReader, RingWriter
from ring_native_support import CAP, HDR, _valid_header, children, drain, header, records  # noqa: F401 (children is a fixture)


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



# ---------------------------------------------------------------- bad input



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
