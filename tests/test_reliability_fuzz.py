"""Issue 6, item 1: hypothesis-drawn hostile frames against the REAL daemon
(`overlapd serve`, tiny model, Paddle) on a real socket.

Every frame is answered (an error frame, or a normal answer when the body
happens to be valid) or its connection is closed; every accepted request ends
exactly once; the daemon never dies; afterwards every KV block is free again
and the resident set is back within RSS_TOLERANCE_KIB of its warmed-up
baseline. CI sends a few thousand frames; bench/reliability.py sends 100,000.
"""

from __future__ import annotations

import time
from collections import Counter

import msgspec
import pytest
from daemon_harness import serve_real
from fuzz_driver import FuzzSession, fuzz_inband, fuzz_streams

MAX_FRAME = 64 * 1024  # small, so oversized bodies are cheap to send
CONTEXT = 64  # any accepted request ends within 64 steps
CI_INBAND = 2500
CI_STREAMS = 800
WARMUP_INBAND = 500
WARMUP_STREAMS = 200
# After the warm-up, error-only traffic moves RSS by nothing at all and the
# allocators' noise is a few hundred KiB; Paddle's known per-step leak
# (docs/reliability.md, Known gaps) adds under 1 MiB at this size. 8 MiB
# still fails a leak of ~3 KiB a frame; bench/reliability.py's 100,000
# frames and the per-step test in test_reliability_load.py are the fine ones.
RSS_TOLERANCE_KIB = 8 * 1024


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    d = serve_real(
        tmp_path_factory.mktemp("fuzz"),
        "--max-model-len", str(CONTEXT),
        config=f"[server]\nmax_frame_bytes = {MAX_FRAME}\n",
    )
    yield d
    assert d.terminate() == 0, d.log()


def settled(d, connections: int) -> dict:
    """Stats once nothing is live; `connections` counts the one asking too."""
    def quiet(s: dict) -> bool:
        return s["live_requests"] == 0 and s["kv_blocks_used"] == 0 and s["connections"] == connections

    s = d.wait_stats(quiet, 30)
    assert quiet(s), s
    return s


def test_hostile_frames_are_answered_and_kv_and_rss_return_to_baseline(daemon):
    session = FuzzSession(daemon.socket_path)
    counts: Counter[str] = Counter()
    fuzz_inband(session, WARMUP_INBAND)
    fuzz_streams(daemon.socket_path, WARMUP_STREAMS, MAX_FRAME, counts)
    base = settled(daemon, connections=2)  # the session's and ours
    rss_before = daemon.rss_kib()

    sent = fuzz_inband(session, CI_INBAND)
    fuzz_streams(daemon.socket_path, CI_STREAMS, MAX_FRAME, counts)
    session.finish()

    after = settled(daemon, connections=1)
    assert daemon.proc.poll() is None, daemon.log()
    assert sent >= CI_INBAND * 0.9
    free = [s["kv_blocks_free"] + s["kv_blocks_evictable"] for s in (base, after)]  # evictable: cached, unheld
    assert free[1] == free[0] and after["kv_blocks_used"] == 0
    # The valid-but-extreme frames really reached the engine, and some were aborted mid-way.
    assert session.accepted > 50 and session.ends["done:aborted"] > 0, (session.answers, session.ends)
    assert counts["oversized"] > 0 and counts["truncated"] > 0 and counts["bad_length"] > 0, counts
    growth = daemon.rss_kib() - rss_before
    assert growth < RSS_TOLERANCE_KIB, f"RSS grew by {growth} KiB over {sent} frames"
    with daemon.client() as c:  # and it still serves
        assert c.complete("still there", max_tokens=4, temperature=0.0).finish_reason in ("length", "eos")



def test_an_id_freed_by_a_prompt_too_long_to_run_is_reused(daemon):
    """A text prompt is accepted before it is encoded; one too long for the
    context then ends with invalid_request, and its id is free again. The
    driver must book that error as the end of the first request, not as the
    refusal of the second one under the same id."""
    session = FuzzSession(daemon.socket_path)
    too_long = {"type": "generate", "id": "a", "prompt": "\U0001F600" * CONTEXT, "max_tokens": 4}
    session.probe(msgspec.msgpack.encode(too_long))
    assert session.live.keys() == {"a"}, session._story()
    time.sleep(1.0)  # encoded and refused by now: its error is on the wire before the next answer
    session.probe(msgspec.msgpack.encode({"type": "generate", "id": "a", "prompt_ids": [5, 6], "max_tokens": 2}))
    assert session.ends["error:invalid_request"] == 1 and session.accepted == 2, (session.ends, session.answers)
    session.finish()
