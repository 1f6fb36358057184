"""Issue 6, items 2 and 3, against the REAL daemon: a crowd of clients that
vanish mid-stream gives every KV block back; a crowd at 10x capacity gets
`overloaded` promptly while the queues stay within their bounds, RSS stays
flat, and the daemon serves normally right after. CI sizes; bench/reliability.py
runs 1,000 clients and 60 s of overload.
"""

from __future__ import annotations

import asyncio

import pytest
from daemon_harness import serve_real
from load_scenarios import Bounds, mass_disconnect, overload, step_memory

CI_LEAVERS = 150
MAX_NUM_SEQS = 4
MAX_WAITING = 8
OVERLOAD_S = 6.0
# An `overloaded` answer is one dict lookup and one frame; on a 2-core machine
# shared with 120 client coroutines its p99 stays far below a step of a full
# batch. 250 ms is the bound a client can plan a retry around.
OVERLOADED_P99_MS = 250.0
# RSS during the overload, after its first second: the daemon's working set
# is all preallocated (KV cache, buffers, bounded queues), so what moves is
# allocator noise of a few MiB; a queue that grew without bound would pass it.
RSS_FLAT_KIB = 16 * 1024


@pytest.fixture(scope="module")
def crowd_daemon(tmp_path_factory):
    # Room for every leaver to wait in line: this test is about disconnects, not overload.
    d = serve_real(tmp_path_factory.mktemp("crowd"), config="[pipeline]\nmax_waiting = 2048\n")
    yield d
    assert d.terminate() == 0, d.log()


def test_clients_vanishing_mid_stream_give_every_kv_block_back(crowd_daemon):
    figures = asyncio.run(mass_disconnect(str(crowd_daemon.socket_path), CI_LEAVERS))
    assert sum(figures.left_by_mode.values()) == CI_LEAVERS and len(figures.left_by_mode) == 3
    with crowd_daemon.client() as c:
        assert c.complete("after the crowd", max_tokens=4, temperature=0.0).finish_reason == "length"


def test_overload_at_10x_capacity_is_refused_promptly_within_bounds(tmp_path):
    d = serve_real(tmp_path, "--max-num-seqs", str(MAX_NUM_SEQS), config=f"[pipeline]\nmax_waiting = {MAX_WAITING}\n")
    try:
        with d.client() as c:
            reference = c.complete("the same question", max_tokens=12, temperature=0.0, ignore_eos=True).token_ids
        bounds = Bounds(max_num_seqs=MAX_NUM_SEQS, max_waiting=MAX_WAITING)
        fig = asyncio.run(overload(str(d.socket_path), d.proc.pid, bounds, duration_s=OVERLOAD_S))
        assert fig.overloaded > fig.clients and fig.completed > 0, fig
        assert fig.overloaded_ms["p99"] < OVERLOADED_P99_MS, fig.overloaded_ms
        # The bounds were reached, not merely respected by an idle daemon.
        assert fig.max_seen["queue_running"] == MAX_NUM_SEQS and fig.max_seen["queue_waiting"] >= MAX_WAITING // 2, fig
        assert fig.rss_kib["max"] - fig.rss_kib["min"] < RSS_FLAT_KIB, fig.rss_kib
        s = d.wait_stats(lambda s: s["live_requests"] == 0 and s["kv_blocks_used"] == 0)
        assert s["live_requests"] == 0 and s["kv_blocks_used"] == 0
        with d.client() as c:  # serves normally right after: same answer as before the storm
            again = c.complete("the same question", max_tokens=12, temperature=0.0, ignore_eos=True)
        assert again.token_ids == reference and again.finish_reason == "length"
    finally:
        d.kill()


# A leak of even a few hundred bytes a step is ~1 GiB a month at 50 steps/s.
LEAK_KIB_PER_1000_STEPS = 256


# Paddle 3.3.1 never frees a tensor made by paddle.to_tensor, nor the ones
# paddle.where makes of Python scalars (~110 B each); the runtime once made
# several per step (~0.7 KiB a step). This test found it.
# Measured after three warm-up rounds and in anonymous memory: after one, on a
# loaded host, the allocator's arenas still grew 160-590 KiB per 1,000 steps
# and the ring's shared pages ~120 B a step, and the test failed in about one
# run of four (issue 15; docs/reliability.md has the figures).
def test_rss_stays_flat_over_engine_steps(crowd_daemon):
    fig = step_memory(str(crowd_daemon.socket_path), crowd_daemon.proc.pid, per_client=8, warmup_rounds=3)
    assert fig.steps > 1000, fig
    assert fig.growth_kib_per_1000_steps < LEAK_KIB_PER_1000_STEPS, fig
