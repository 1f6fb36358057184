"""Reliability at full counts (issue 6): the scenarios CI runs small, run big,
against the real daemon (`overlapd serve`, tiny model, Paddle) on local unix
sockets. Each scenario checks its properties (an assertion fails it) and
reports what it measured; docs/reliability.md quotes the figures.

    python bench/reliability.py                      # everything, full counts (~10 min on 2 cores)
    python bench/reliability.py --only fuzz --fuzz-frames 20000
    python bench/reliability.py --json > figures.json

Scenarios: fuzz (100,000 hostile frames + 10,000 framing-level probes),
disconnect (1,000 clients vanish mid-stream), overload (10x capacity for
60 s), sigterm (200 clients), restart (SIGKILL, new epoch), eviction (a
killed backpressure reader), slow_reader (default and backpressure), kv
(preemption and recompute), steps (RSS per 1000 engine steps of plain
traffic). Every loop is bounded in count and time.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import platform
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Any, Callable

TESTS = Path(__file__).resolve().parent.parent / "tests"
sys.path.insert(0, str(TESTS))

from daemon_harness import serve_real  # noqa: E402
from fault_scenarios import killed_backpressure_reader, sigkill_and_restart, sigterm_under_load  # noqa: E402
from fuzz_driver import FuzzSession, fuzz_inband, fuzz_streams  # noqa: E402
from load_scenarios import Bounds, mass_disconnect, overload, step_memory  # noqa: E402
from ring_scenarios import slow_reader_backpressure, slow_reader_default_mode  # noqa: E402

FUZZ_MAX_FRAME = 64 * 1024
FUZZ_CONTEXT = 64
FUZZ_CHUNK = 10_000  # RSS is sampled after every chunk: a leak grows, a working set does not


def fuzz(tmp: Path, frames: int, streams: int) -> dict[str, Any]:
    d = serve_real(tmp, "--max-model-len", str(FUZZ_CONTEXT), config=f"[server]\nmax_frame_bytes = {FUZZ_MAX_FRAME}\n")
    try:
        session = FuzzSession(d.socket_path)
        counts: Counter[str] = Counter()
        fuzz_inband(session, 500)  # the same warm-up as CI
        fuzz_streams(d.socket_path, 200, FUZZ_MAX_FRAME, counts)
        base = d.wait_stats(lambda s: s["live_requests"] == 0 and s["kv_blocks_used"] == 0)
        rss = [d.rss_kib()]
        t0 = time.monotonic()
        sent = 0
        while sent < frames:
            sent += fuzz_inband(session, min(FUZZ_CHUNK, frames - sent))
            d.wait_stats(lambda s: s["live_requests"] <= len(session.live))
            rss.append(d.rss_kib())
            print(f"  fuzz: {sent} frames, RSS {rss[-1]} KiB", file=sys.stderr, flush=True)
        inband_s = time.monotonic() - t0
        t0 = time.monotonic()
        fuzz_streams(d.socket_path, streams, FUZZ_MAX_FRAME, counts)
        streams_s = time.monotonic() - t0
        session.finish()
        after = d.wait_stats(lambda s: s["live_requests"] == 0 and s["kv_blocks_used"] == 0 and s["connections"] == 1, 60)
        rss.append(d.rss_kib())
        free = [s["kv_blocks_free"] + s["kv_blocks_evictable"] for s in (base, after)]  # evictable: cached, unheld
        assert after["kv_blocks_used"] == 0 and free[1] == free[0], after
        assert d.proc.poll() is None
        assert d.terminate() == 0
    finally:
        d.kill()
    return {
        "inband_frames": sent, "inband_s": round(inband_s, 1), "stream_probes": streams, "streams_s": round(streams_s, 1),
        "answers": dict(session.answers), "request_ends": dict(session.ends), "accepted": session.accepted,
        "stream_kinds": dict(counts), "kv_blocks_free": free,
        "rss_kib_baseline": rss[0], "rss_kib_per_10k": rss[1:-1], "rss_kib_end": rss[-1],
        "rss_growth_kib": rss[-1] - rss[0], "steps": after["steps"] - base["steps"],
    }


def disconnect(tmp: Path, clients: int) -> dict[str, Any]:
    d = serve_real(tmp, config="[pipeline]\nmax_waiting = 2048\n")
    try:
        fig = asyncio.run(mass_disconnect(str(d.socket_path), clients))
        with d.client() as c:
            assert c.complete("after the crowd", max_tokens=4, temperature=0.0).finish_reason == "length"
        assert d.terminate() == 0
    finally:
        d.kill()
    return dataclasses.asdict(fig)


def overload_run(tmp: Path, seconds: float) -> dict[str, Any]:
    bounds = Bounds(max_num_seqs=4, max_waiting=8)
    d = serve_real(tmp, "--max-num-seqs", "4", config="[pipeline]\nmax_waiting = 8\n")
    try:
        with d.client() as c:
            before = c.complete("the same question", max_tokens=12, temperature=0.0, ignore_eos=True).token_ids
        fig = asyncio.run(overload(str(d.socket_path), d.proc.pid, bounds, duration_s=seconds))
        d.wait_stats(lambda s: s["live_requests"] == 0)
        t0 = time.monotonic()
        with d.client() as c:
            after = c.complete("the same question", max_tokens=12, temperature=0.0, ignore_eos=True).token_ids
        first_after_ms = (time.monotonic() - t0) * 1e3
        assert after == before
        assert d.terminate() == 0
    finally:
        d.kill()
    out = dataclasses.asdict(fig)
    out["first_request_after_ms"] = round(first_after_ms, 1)
    return out


def steps(tmp: Path, rounds: int) -> dict[str, Any]:
    d = serve_real(tmp)
    try:
        fig = step_memory(str(d.socket_path), d.proc.pid, rounds=rounds, per_client=25, warmup_rounds=3)
        assert d.terminate() == 0
    finally:
        d.kill()
    return dataclasses.asdict(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="", help="comma-separated scenario names (default: all)")
    ap.add_argument("--fuzz-frames", type=int, default=100_000)
    ap.add_argument("--fuzz-streams", type=int, default=10_000)
    ap.add_argument("--clients", type=int, default=1000, help="clients that vanish mid-stream")
    ap.add_argument("--overload-s", type=float, default=60.0)
    ap.add_argument("--sigterm-clients", type=int, default=200)
    ap.add_argument("--step-rounds", type=int, default=10, help="rounds of 4 x 25 requests of 48 tokens")
    ap.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    args = ap.parse_args()

    from test_reliability_kv import TIGHT_BLOCKS, run_batch

    def kv(tmp: Path) -> dict[str, Any]:
        (tmp / "roomy").mkdir()
        (tmp / "tight").mkdir()
        ref, roomy = run_batch(tmp / "roomy")
        got, tight = run_batch(tmp / "tight", "--num-blocks", str(TIGHT_BLOCKS))
        assert got == ref and tight["preemptions"] > 0
        return {"requests": len(got), "identical": got == ref, "preemptions": tight["preemptions"],
                "steps_roomy": roomy["steps"], "steps_tight": tight["steps"]}

    scenarios: dict[str, Callable[[Path], Any]] = {
        "fuzz": lambda t: fuzz(t, args.fuzz_frames, args.fuzz_streams),
        "disconnect": lambda t: disconnect(t, args.clients),
        "overload": lambda t: overload_run(t, args.overload_s),
        "sigterm": lambda t: dataclasses.asdict(sigterm_under_load(t, clients=args.sigterm_clients)),
        "restart": lambda t: dataclasses.asdict(sigkill_and_restart(t)),
        "eviction": lambda t: dataclasses.asdict(killed_backpressure_reader(t)),
        "slow_reader": lambda t: dataclasses.asdict(slow_reader_default_mode(t)),
        "slow_reader_backpressure": lambda t: dataclasses.asdict(slow_reader_backpressure(t)),
        "kv": kv,
        "steps": lambda t: steps(t, args.step_rounds),
    }
    wanted = [s for s in args.only.split(",") if s] or list(scenarios)
    unknown = set(wanted) - set(scenarios)
    if unknown:
        ap.error(f"unknown scenario(s) {sorted(unknown)}; known: {', '.join(scenarios)}")
    report: dict[str, Any] = {"machine": f"{platform.node()} {platform.machine()}, {_cores()} cores",
                              "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv), "scenarios": {}}
    failed = 0
    for name in wanted:
        print(f"{name} ...", file=sys.stderr, flush=True)
        t0 = time.monotonic()
        with tempfile.TemporaryDirectory(prefix=f"ovl-rel-{name}-") as tmp:
            try:
                figures = {"ok": True, **scenarios[name](Path(tmp))}
            except Exception as exc:  # noqa: BLE001 - one failed scenario is reported, the rest still run
                failed += 1
                figures = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:2000]}
                traceback.print_exc()
        figures["wall_s"] = round(time.monotonic() - t0, 1)
        report["scenarios"][name] = figures
        print(f"{name}: {json.dumps(figures, default=str)}", file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    print(f"{len(wanted) - failed} passed, {failed} failed", file=sys.stderr)
    return 1 if failed else 0


def _cores() -> int:
    import os

    return len(os.sched_getaffinity(0))


if __name__ == "__main__":
    sys.exit(main())
