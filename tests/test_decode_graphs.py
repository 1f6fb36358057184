"""Decode-graph bookkeeping on the CPU: buckets, which steps are captured, and,
with a fake capture on the Torch CPU runtime, that padding rows, the spare KV
block and recaptures as the context grows give exactly the eager tokens
(tests/gpu runs the real CUDA capture)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from engine_test_support import Driver, Req, make_runner, tiny_cache, tiny_loaded  # noqa: F401
from overlapd.stages.runner.decode_graphs import DecodeGraphs, logprob_width, row_buckets
from overlapd.stages.step_types import SamplingParams


def test_row_buckets_and_keys() -> None:
    assert row_buckets(64) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]
    assert row_buckets(3) == [1, 2, 3]
    g = DecodeGraphs(lambda fn: None, max_rows=64, max_blocks=20, context_step_blocks=8)
    assert g.key(3, 17, 16) == (4, 8, False, 0, False)
    assert g.key(64, 16 * 9, 16) == (64, 16, False, 0, False)
    assert g.key(9, 16 * 19, 16, sampled=True, logprobs=20) == (16, 20, True, 20, False)  # capped at the table width
    assert [logprob_width(k, 20, 50_000) for k in (0, 1, 5, 20)] == [0, 20, 20, 20]
    assert logprob_width(5, 20, 12) == 12
    with pytest.raises(ValueError):
        g.key(65, 1, 16)


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch is not installed (optional)")
def test_replayed_decode_steps_give_the_eager_tokens() -> None:
    """Torch CPU runtime (in a subprocess, away from Paddle) with a fake capture:
    padded buckets, the spare KV block and recaptures keep every token."""
    script = Path(__file__).with_name("graph_replay_check.py")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["same_overlapped"] and r["same_sync"]
    # 4 rows, then 3 (padded to 4), 2, 1 as requests finish; contexts cross the 8-block bucket
    assert r["row_buckets"] == [1, 2, 4] and r["block_buckets"] == [8, 16]
    assert r["replays"] > 3 * r["captures"]
    # greedy, seeded (top-p, top-k, both) and logprob rows in one batch: graph
    # replays give the eager tokens and logprobs, overlapped and in sync
    assert r["mixed_same_overlapped"] and r["mixed_same_sync"] and r["mixed_eager_overlap_is_sync"]
    assert r["mixed_keys"] == [[True, 20, False]] and r["mixed_replays"] > 20
    assert r["mixed_logprob_rows"] == [30, 34, 26, 22, 31] and r["mixed_distinct_streams"] == 5
    # speculative decoding: steps of verify rows (and plain decodes) replay graphs
    # of their own variant and give the eager tokens, overlapped and in sync
    assert r["spec_same"]
    assert [True, 20, True] in r["spec_keys"], r["spec_keys"]


def test_seeded_and_logprob_decode_steps_are_captured_prefill_stays_eager(tiny_loaded) -> None:
    runner = make_runner(tiny_loaded, block_size=4)
    keys: list = []
    runner.enable_graphs(lambda fn: _Eager(fn))
    real_run = runner.graphs.run
    runner.graphs.run = lambda key, body: (keys.append(key), real_run(key, body))[1]
    d = Driver(runner)
    d.add(Req(1, [0, 5, 9], SamplingParams(temperature=0.8, max_tokens=6), seed=3))
    d.add(Req(2, [0, 7], SamplingParams(temperature=0.0, max_tokens=6, logprobs=2)))
    d.run()
    # the first step prefills both prompts (eager); every later one is a decode step
    assert len(keys) == 5 and {k[2:] for k in keys} == {(True, 20, False)}
    assert runner.graphs.captures == 1


class _Eager:
    """A 'graph' that runs its body on every replay (the outputs are the last run's)."""

    def __init__(self, fn) -> None:
        self.fn, self.output = fn, fn()

    def replay(self) -> None:
        self.output = self.fn()
