"""Crowds of asyncio clients against a live daemon: mass disconnects (issue 6,
item 2) and overload (item 3). Each scenario asserts its properties and
returns the figures it measured, so tests/test_reliability_load.py (CI sizes)
and bench/reliability.py (full sizes) run the same code.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field

from daemon_harness import AsyncRawConn, rss_kib
from overlapd.daemon.protocol import (
    AcceptedFrame,
    DoneFrame,
    ErrorFrame,
    StatsFrame,
    StatsQuery,
    TokensFrame,
)

WAIT_S = 60.0  # per frame: generous for a loaded 2-core machine, still a bound


async def stats(conn: AsyncRawConn) -> dict[str, int | float]:
    conn.send(StatsQuery())
    frame = await conn.recv(WAIT_S)
    assert isinstance(frame, StatsFrame), frame
    return frame.counters


async def wait_stats(conn: AsyncRawConn, predicate, timeout: float = 30.0) -> dict[str, int | float]:
    deadline = time.monotonic() + timeout
    while True:
        s = await stats(conn)
        if predicate(s) or time.monotonic() > deadline:
            return s
        await asyncio.sleep(0.02)


def pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# ---------------------------------------------------------------- item 2: mass disconnects

LEAVE_MODES = ("accepted", "first_tokens", "mid_stream")


async def _leaver(path: str, i: int, max_tokens: int, start: asyncio.Event) -> str:
    """One client: a long request, then it vanishes at a point chosen by `i`.
    Returns how far it got."""
    mode = LEAVE_MODES[i % len(LEAVE_MODES)]
    hard = i % 2 == 1  # half leave with RST, half with FIN
    await start.wait()
    conn = await AsyncRawConn.open(path)
    conn.send({"type": "generate", "id": f"m{i}", "prompt": f"client {i} leaves", "max_tokens": max_tokens,
               "ignore_eos": True, "temperature": 0.0})
    frames = 0
    try:
        while True:
            frame = await conn.recv(WAIT_S)
            assert frame is not None, f"client {i}: closed by the daemon"
            assert not isinstance(frame, (ErrorFrame, DoneFrame)), f"client {i}: ended before it left: {frame}"
            frames += 1
            if mode == "accepted" and isinstance(frame, AcceptedFrame):
                break
            if mode == "first_tokens" and isinstance(frame, TokensFrame):
                break
            if mode == "mid_stream" and frames >= 2 + i % 7:
                break
    finally:
        if hard:
            conn.abort()
        else:
            await conn.close()
    return mode


@dataclass
class DisconnectFigures:
    clients: int
    left_by_mode: dict[str, int]
    seconds: float
    kv_blocks_free: int
    disconnect_aborts: int


async def mass_disconnect(path: str, clients: int, max_tokens: int = 1000) -> DisconnectFigures:
    """`clients` clients each start a long request and vanish mid-way; then
    every KV block must be free, nothing live, and only our connection left."""
    probe = await AsyncRawConn.open(path)
    try:
        before = await stats(probe)
        start = asyncio.Event()
        tasks = [asyncio.create_task(_leaver(path, i, max_tokens, start)) for i in range(clients)]
        t0 = time.monotonic()
        start.set()
        modes = await asyncio.wait_for(asyncio.gather(*tasks), clients * 0.5 + 60)

        def quiet(s: dict) -> bool:
            return s["live_requests"] == 0 and s["kv_blocks_used"] == 0 and s["connections"] == 1

        after = await wait_stats(probe, quiet, 60)
        seconds = time.monotonic() - t0
    finally:
        await probe.close()
    assert quiet(after), after
    # free again, or kept evictable by the prefix cache: either way nobody holds it
    free = [s["kv_blocks_free"] + s["kv_blocks_evictable"] for s in (before, after)]
    assert free[1] == free[0], free
    aborts = after["disconnect_aborts"] - before["disconnect_aborts"]
    assert aborts == clients, f"{aborts} of {clients} vanished requests were aborted"
    return DisconnectFigures(clients, dict(Counter(modes)), round(seconds, 2), int(free[1]), aborts)


# ---------------------------------------------------------------- item 3: overload


@dataclass
class Bounds:
    max_num_seqs: int
    max_waiting: int
    queue_depth: int = 2  # [pipeline] queue_depth's default

    def check(self, s: dict) -> None:
        assert s["queue_admission"] + s["queue_waiting"] <= self.max_waiting, s
        assert s["queue_running"] <= self.max_num_seqs, s
        for q in ("queue_prepared", "queue_launched", "queue_processed"):
            assert s[q] <= self.queue_depth, (q, s[q])
        assert s["live_requests"] <= self.max_waiting + self.max_num_seqs, s


@dataclass
class OverloadFigures:
    clients: int
    seconds: float
    attempts: int = 0
    overloaded: int = 0
    completed: int = 0
    tokens: int = 0
    overloaded_ms: dict[str, float] = field(default_factory=dict)
    e2e_ms: dict[str, float] = field(default_factory=dict)
    max_seen: dict[str, int] = field(default_factory=dict)
    samples: int = 0
    rss_kib: dict[str, int] = field(default_factory=dict)


async def _pusher(path: str, i: int, deadline: float, max_tokens: int, retry_s: float,
                  overloaded_s: list[float], e2e_s: list[float], counts: Counter[str]) -> None:
    """Keeps one request outstanding until the deadline, retrying after `retry_s` when refused."""
    conn = await AsyncRawConn.open(path)
    try:
        n = 0
        while time.monotonic() < deadline and n < 100_000:
            n += 1
            rid = f"c{i}-{n}"
            t0 = time.monotonic()
            conn.send({"type": "generate", "id": rid, "prompt": f"push {i}", "max_tokens": max_tokens,
                       "ignore_eos": True, "temperature": 0.0})
            counts["attempts"] += 1
            frame = await conn.recv(WAIT_S)
            if isinstance(frame, ErrorFrame):
                assert frame.code == "overloaded" and frame.id == rid, frame
                overloaded_s.append(time.monotonic() - t0)
                counts["overloaded"] += 1
                await asyncio.sleep(retry_s)
                continue
            assert isinstance(frame, AcceptedFrame) and frame.id == rid, frame
            tokens = 0
            while True:
                frame = await conn.recv(WAIT_S)
                assert frame is not None and getattr(frame, "id", None) == rid, frame
                if isinstance(frame, TokensFrame):
                    tokens += len(frame.token_ids)
                    continue
                assert isinstance(frame, DoneFrame) and frame.finish_reason == "length", frame
                break
            assert tokens == max_tokens, (rid, tokens)
            e2e_s.append(time.monotonic() - t0)
            counts["completed"] += 1
            counts["tokens"] += tokens
    finally:
        await conn.close()


async def overload(path: str, pid: int, bounds: Bounds, *, factor: int = 10, duration_s: float = 8.0,
                   max_tokens: int = 16, retry_s: float = 0.02, sample_s: float = 0.05,
                   warmup_s: float = 1.0) -> OverloadFigures:
    """`factor` x (max_num_seqs + max_waiting) clients, each keeping a request
    outstanding for `duration_s`; the queues are sampled every `sample_s`
    and must stay within `bounds`; RSS is sampled too (after `warmup_s`)."""
    clients = factor * (bounds.max_num_seqs + bounds.max_waiting)
    figures = OverloadFigures(clients=clients, seconds=duration_s)
    overloaded_s: list[float] = []
    e2e_s: list[float] = []
    counts: Counter[str] = Counter()
    probe = await AsyncRawConn.open(path)
    rss: list[int] = []
    max_seen: Counter[str] = Counter()
    try:
        t0 = time.monotonic()
        deadline = t0 + duration_s
        tasks = [asyncio.create_task(_pusher(path, i, deadline, max_tokens, retry_s, overloaded_s, e2e_s, counts))
                 for i in range(clients)]
        while time.monotonic() < deadline:
            s = await stats(probe)
            bounds.check(s)
            figures.samples += 1
            for k in ("queue_admission", "queue_waiting", "queue_running", "queue_prepared", "queue_launched",
                      "queue_processed", "live_requests"):
                max_seen[k] = max(max_seen[k], int(s[k]))
            if time.monotonic() - t0 >= warmup_s:
                rss.append(rss_kib(pid))
            await asyncio.sleep(sample_s)
        await asyncio.wait_for(asyncio.gather(*tasks), WAIT_S)
    finally:
        await probe.close()
    figures.attempts, figures.overloaded = counts["attempts"], counts["overloaded"]
    figures.completed, figures.tokens = counts["completed"], counts["tokens"]
    figures.overloaded_ms = _ms(overloaded_s)
    figures.e2e_ms = _ms(e2e_s)
    figures.max_seen = dict(max_seen)
    if rss:
        figures.rss_kib = {"first": rss[0], "min": min(rss), "max": max(rss), "last": rss[-1],
                           "median": int(statistics.median(rss))}
    return figures


def _ms(seconds: list[float]) -> dict[str, float]:
    return {"n": len(seconds), "p50": round(pct(seconds, 0.5) * 1e3, 2), "p99": round(pct(seconds, 0.99) * 1e3, 2),
            "max": round(max(seconds, default=0.0) * 1e3, 2)}


# ---------------------------------------------------------------- memory over engine steps


@dataclass
class StepMemoryFigures:
    steps: int
    requests: int
    rss_kib: list[int]  # after the warm-up, then after each round
    growth_kib_per_1000_steps: float


async def _sequential(path: str, i: int, n: int, max_tokens: int) -> None:
    conn = await AsyncRawConn.open(path)
    try:
        for j in range(n):
            conn.send({"type": "generate", "id": f"s{i}-{j}", "prompt": f"steady {i} {j}", "max_tokens": max_tokens,
                       "ignore_eos": True, "temperature": 0.0 if j % 2 else 0.8, "seed": j})
            while True:
                frame = await conn.recv(WAIT_S)
                assert frame is not None and not isinstance(frame, ErrorFrame), frame
                if isinstance(frame, DoneFrame):
                    break
    finally:
        await conn.close()


def step_memory(path: str, pid: int, rounds: int = 3, clients: int = 4, per_client: int = 10,
                max_tokens: int = 48, warmup_rounds: int = 1) -> StepMemoryFigures:
    """Plain traffic in rounds after warm-up rounds; RSS after each. Every
    buffer is preallocated, so a daemon that does not leak stays flat: the
    figure is the growth per 1000 engine steps (least squares over the rounds).
    Anonymous memory only (RssAnon): the ring is shared memory, and its
    pages join VmRSS as the writer first reaches them, ~120 B a step until
    it has wrapped once. The allocator's arenas (one per thread that
    allocates: the loop, the execute thread, the tokenize workers) keep
    growing towards their working size for a few thousand steps, faster on
    a loaded host; a measurement that starts too early sees that, not a
    leak (docs/reliability.md, issue 15)."""

    def one_round() -> None:
        async def run() -> None:
            await asyncio.gather(*[_sequential(path, i, per_client, max_tokens) for i in range(clients)])

        asyncio.run(run())

    async def steps_now() -> int:
        conn = await AsyncRawConn.open(path)
        try:
            return int((await stats(conn))["steps"])
        finally:
            await conn.close()

    for _ in range(warmup_rounds):  # shapes, allocator pools, free lists
        one_round()
    rss = [rss_kib(pid, "RssAnon")]
    points = [(asyncio.run(steps_now()), rss[0])]
    for _ in range(rounds):
        one_round()
        rss.append(rss_kib(pid, "RssAnon"))
        points.append((asyncio.run(steps_now()), rss[-1]))
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mx) * (y - my) for x, y in points) / max(1e-9, sum((x - mx) ** 2 for x in xs))
    return StepMemoryFigures(xs[-1] - xs[0], rounds * clients * per_client, rss, round(slope * 1000, 1))
