"""kernels/examples/ring_tail.c: a C consumer built from overlapd/ring.h alone.

The ring is written from Python with STEP bodies packed here with struct
(SPEC 1.3), so the C decoder is checked against an independent packer.
"""

import os
import select
import shutil
import signal
import struct
import subprocess
import time
from pathlib import Path

import pytest

from overlapd.kernels._native import RingWriter

ROOT = Path(__file__).resolve().parents[1]
INCLUDE = ROOT / "kernels" / "include"
EXAMPLE = ROOT / "kernels" / "examples" / "ring_tail.c"
CAP = 65536

CC = shutil.which("cc") or shutil.which("gcc")
CXX = shutil.which("c++") or shutil.which("g++")
pytestmark = pytest.mark.skipif(not CC, reason="no C compiler")


def pack_step(step_id, rows, k=0, T=1, flag=None):
    """A STEP body. rows: (request_id, finish, [accepted column tokens...]);
    candidates are token+1000*j, logprobs -0.5*j, ranks col+1."""
    flag = flag if flag is not None else (2 if T > 1 else 1)
    bsz = len(rows)
    out = struct.pack(f"<{3 + bsz}i", step_id, flag | k << 8 | T << 16, bsz, *[len(r[2]) for r in rows])
    out += bytes(-len(out) % 8)
    out += struct.pack(f"<{bsz}Q", *[r[0] for r in rows])
    out += struct.pack(f"<{bsz}i", *[r[1] for r in rows])
    toks, lps, ranks = [], [], []
    for _, _, accepted in rows:
        for col in range(T):
            tok = accepted[col] if col < len(accepted) else 0
            toks += [tok] + [tok + 1000 * j if tok else 0 for j in range(1, k + 1)]
            lps += [-0.5 * j if tok else 0.0 for j in range(k + 1)]
            ranks.append(col + 1 if tok else 0)
    out += struct.pack(f"<{len(toks)}i", *toks)
    if k:
        out += struct.pack(f"<{len(lps)}f", *lps)
        out += struct.pack(f"<{len(ranks)}i", *ranks)
    return out + bytes(-len(out) % 8)


def expected_line(seq, step_id, rows, k=0, T=1):
    parts = [f" {rid}:" + ",".join(str(t) for t in acc) for rid, _, acc in rows]
    return f"seq={seq} step={step_id} bsz={len(rows)} k={k} T={T} rows:" + "".join(parts)


@pytest.fixture(scope="module")
def ring_tail(tmp_path_factory):
    exe = tmp_path_factory.mktemp("bin") / "ring_tail"
    subprocess.run(
        [CC, "-std=c11", "-Wall", "-Werror", "-I", str(INCLUDE), str(EXAMPLE), "-o", str(exe)],
        check=True,
        timeout=60,
    )
    return str(exe)


def test_header_compiles_as_c_and_cpp(tmp_path):
    src = tmp_path / "use.c"
    src.write_text('#include "overlapd/ring.h"\nint main(void) { ovl_reader r; (void)r; return 0; }\n')
    subprocess.run([CC, "-std=c11", "-Wall", "-Wextra", "-Werror", "-I", str(INCLUDE), "-c", str(src),
                    "-o", str(tmp_path / "use.o")], check=True, timeout=60)
    if CXX:
        cpp = tmp_path / "use.cpp"
        cpp.write_text(src.read_text())
        subprocess.run([CXX, "-std=c++17", "-Wall", "-Wextra", "-Werror", "-fsyntax-only", "-I", str(INCLUDE),
                        str(cpp)], check=True, timeout=60)


STEPS = [
    (1, [(7, 0, [11]), (8, 0, [12])], 0, 1),
    (2, [(7, 1, [13])], 2, 1),  # top-2 logprobs
    (3, [(9, 0, [21, 22]), (10, 3, [31, 32, 33])], 0, 3),  # speculative, T=3
    (4, [], 0, 1),  # a step with no rows
    (5, [(11, 0, [41, 42])], 4, 2),  # speculative with logprobs
]


def test_prints_step_records_from_head(tmp_path, ring_tail):
    p = str(tmp_path / "ring")
    w = RingWriter(p, CAP)
    for step_id, rows, k, T in STEPS:
        w.publish(pack_step(step_id, rows, k, T))
    w.publish(pack_step(-6, [(7, 1, [99])]))  # the producer's last record
    out = subprocess.run([ring_tail, "--from-head", p, "0"], capture_output=True, text=True, timeout=10)
    assert out.returncode == 0, out.stderr
    want = [expected_line(i, *s) for i, s in enumerate(STEPS)] + [expected_line(5, -6, [(7, 1, [99])])]
    assert out.stdout.splitlines() == want
    w.close()


def test_stops_after_count_and_rejects_bad_bodies(tmp_path, ring_tail):
    p = str(tmp_path / "ring")
    w = RingWriter(p, CAP)
    bad = struct.pack("<4i", 1, 1 | 1 << 16, 3, 1)  # meta says bsz=3, body has none of it
    w.publish(bad)
    w.publish(struct.pack("<4i", 1, 1 | 1 << 16, 1, 5) + bytes(16))  # accept_num 5 > T=1
    w.publish(pack_step(8, [(1, 0, [2])]))
    w.publish(pack_step(9, [(1, 0, [3])]))
    out = subprocess.run([ring_tail, "--from-head", p, "1"], capture_output=True, text=True, timeout=10)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        "seq=0 bad STEP body: STEP body shorter than its meta describes",
        "seq=1 bad STEP body: STEP body field out of range",
        expected_line(2, 8, [(1, 0, [2])]),
    ]
    w.close()


class Tail:
    """ring_tail running live; lines read with timeouts."""

    def __init__(self, exe, path):
        self.p = subprocess.Popen([exe, path, "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.buf = b""
        ready, _, _ = select.select([self.p.stderr], [], [], 10)
        assert ready and b"reading" in self.p.stderr.readline()

    def line(self, timeout=5.0):
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            assert left > 0, "ring_tail printed nothing in time"
            if select.select([self.p.stdout], [], [], left)[0]:
                chunk = os.read(self.p.stdout.fileno(), 65536)
                assert chunk, f"ring_tail exited with {self.p.wait()}"
                self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line.decode()


def test_live_tail_reports_losses_and_epochs(tmp_path, ring_tail):
    p = str(tmp_path / "ring")
    w = RingWriter(p, CAP)
    t = Tail(ring_tail, p)
    try:
        w.publish(pack_step(1, [(5, 0, [1])]))
        assert t.line() == expected_line(0, 1, [(5, 0, [1])])
        t.p.send_signal(signal.SIGSTOP)  # a reader that stalls ...
        for i in range(2, 2002):  # ... while the producer laps it several times
            w.publish(pack_step(i, [(5, 0, [i])]))
        t.p.send_signal(signal.SIGCONT)
        lost = t.line()
        first, last = (int(x.split("=")[1]) for x in lost.split()[1:])
        assert lost.startswith("lost ") and first == 1 and last > 1
        for seq in range(last + 1, 2001):  # then everything still intact, in order
            assert t.line() == expected_line(seq, seq + 1, [(5, 0, [seq + 1])])

        w.close(clean=False)  # the producer restarts (same size: in place)
        w = RingWriter(p, CAP)
        assert t.line() == f"epoch {w.epoch}"
        w.publish(pack_step(-1, [(6, 1, [7])]))
        assert t.line() == expected_line(0, -1, [(6, 1, [7])])
        assert t.p.wait(timeout=5) == 0
    finally:
        if t.p.poll() is None:
            t.p.kill()
            t.p.wait(timeout=5)
        w.close()


@pytest.mark.parametrize("content", [b"", b"not a ring at all\n" * 1000])
def test_not_a_ring_is_a_one_line_error(tmp_path, ring_tail, content):
    p = tmp_path / "bogus"
    p.write_bytes(content)
    out = subprocess.run([ring_tail, str(p), "1"], capture_output=True, text=True, timeout=10)
    assert out.returncode != 0
    assert out.stdout == ""
    lines = out.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("ring_tail: ") and "not an overlapd ring" in lines[0]
