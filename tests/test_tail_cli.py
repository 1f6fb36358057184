"""`overlapd tail` reads a ring written by another process and prints SPEC 3's JSON lines."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from overlapd.kernels.ring import RingReader, RingWriter, Step

TAIL = [sys.executable, "-m", "overlapd.daemon", "tail"]


def run_tail(*args: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*TAIL, *args], capture_output=True, text=True, timeout=timeout)


def test_tail_prints_steps_as_json_lines_and_stops_at_the_negated_step(tmp_path):
    path = tmp_path / "r.ring"
    with RingWriter(path, capacity=1 << 16, vocab_size=1000, model_name="tiny") as w:
        w.publish_step(step_id=1, request_id=[7, 9], finish=[0, 3], tokens=[11, 12])
        tokens = np.array([[[5, 6, 7], [8, 9, 10]]], dtype=np.int32)  # bsz 1, T 2, k 2
        logprobs = -np.array([[[0.5, 0.25, 2.0], [1.5, 3.0, 4.0]]], dtype=np.float32)
        w.publish_step(
            step_id=2, flag=2, request_id=[7], finish=[1], tokens=tokens, accept_num=[1],
            logprobs=logprobs, ranks=[[2, 1]],
        )
        w.publish_step(step_id=-3, request_id=[], finish=[], tokens=np.zeros(0, np.int32))
        w.publish_step(step_id=4, request_id=[1], finish=[0], tokens=[1])  # after the end: never printed

        proc = run_tail(str(path), "--from-head")
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [line["step_id"] for line in lines] == [1, 2, -3]
    first, second, last = lines
    assert list(first) == ["seq", "step_id", "flag", "k", "T", "publish_ns", "rows"]
    assert first["seq"] == 0 and first["flag"] == 1 and first["k"] == 0 and first["T"] == 1
    assert first["rows"] == [
        {"request_id": 7, "finish": 0, "tokens": [11]},
        {"request_id": 9, "finish": 3, "tokens": [12]},
    ]
    # accept_num = 1 of T = 2: only the first column is printed.
    assert second["rows"] == [
        {"request_id": 7, "finish": 1, "tokens": [5], "logprobs": [-0.5], "ranks": [2], "top": [[[6, -0.25], [7, -2.0]]]}
    ]
    assert (second["flag"], second["k"], second["T"]) == (2, 2, 2)
    assert last["rows"] == [] and last["seq"] == 2
    assert second["publish_ns"] >= first["publish_ns"] > 0


def test_tail_count_exits_after_n_records(tmp_path):
    path = tmp_path / "r.ring"
    with RingWriter(path, capacity=1 << 16) as w:
        for step in range(1, 6):
            w.publish_step(step_id=step, request_id=[step], finish=[0], tokens=[step])
        proc = run_tail(str(path), "--from-head", "--count", "2")
    assert proc.returncode == 0, proc.stderr
    assert [json.loads(x)["step_id"] for x in proc.stdout.splitlines()] == [1, 2]


@pytest.mark.parametrize(
    "content",
    [None, b"", b"not a ring at all" * 1000, b"OVLDRING" + b"\x02\x00\x00\x00" + b"\0" * 9000],
    ids=["missing", "empty", "garbage", "wrong-version"],
)
def test_tail_on_something_that_is_not_a_ring_fails_with_one_line(tmp_path, content):
    path = tmp_path / "bad.ring"
    if content is not None:
        path.write_bytes(content)
    proc = run_tail(str(path))
    assert proc.returncode != 0
    assert proc.stdout == ""
    err = proc.stderr.strip()
    assert err.startswith("overlapd tail: ") and "\n" not in err and "Traceback" not in err


def test_python_reader_yields_steps_with_views(tmp_path):
    path = tmp_path / "r.ring"
    with RingWriter(path, capacity=1 << 16, model_name="tiny", vocab_size=512) as w:
        reader = RingReader(path, from_head=True)
        assert reader.model_name == "tiny" and reader.vocab_size == 512 and reader.epoch == w.epoch
        for step in range(1, 4):
            assert w.publish_step(step_id=step, request_id=[step, 100], finish=[0, 0], tokens=[step, 5]) == step - 1
        got = [reader.read(timeout=1) for _ in range(3)]
        assert all(isinstance(s, Step) for s in got)
        assert [s.seq for s in got] == [0, 1, 2]
        assert [s.view.request_id.tolist() for s in got] == [[1, 100], [2, 100], [3, 100]]
        assert reader.read(timeout=0.05) is None
        reader.close()
