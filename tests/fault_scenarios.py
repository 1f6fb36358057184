"""Faults under load against the real daemon (issue 6, items 4 and 5): SIGTERM
drains with one end per accepted request and a cleanly closed ring; SIGKILL
and a restart are seen by ring readers as a new epoch within a second; a
killed backpressure reader gives its slot back. Each scenario asserts its
properties and returns its figures (tests and bench/reliability.py share them).
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from daemon_harness import AsyncRawConn, EchoDaemon, serve_real
from overlapd.daemon.client import Client, ClientError
from overlapd.daemon.protocol import AcceptedFrame, DoneFrame, ErrorFrame, TokensFrame
from ring_probe import FLAG_CLEAN_CLOSE, JsonLines, ring_header

WAIT_S = 60.0


# ---------------------------------------------------------------- item 4: SIGTERM under load


@dataclass
class Ledger:
    """What the clients saw, per client id."""

    accepted: dict[str, int] = field(default_factory=dict)  # client id -> request_id
    ends: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    tokens: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))
    refused: dict[str, str] = field(default_factory=dict)  # never accepted: client id -> code
    closed_after_sigterm: int = 0


async def _worker(path: str, i: int, ledger: Ledger, stop_after: float) -> None:
    """Requests one after another (short and long ones) until the daemon says
    it is shutting down or closes the connection."""
    conn = await AsyncRawConn.open(path)
    try:
        for n in range(10_000):
            cid = f"w{i}-{n}"
            long = (i + n) % 3 == 0  # a third would outlive any drain timeout
            try:
                conn.send({"type": "generate", "id": cid, "prompt": f"worker {i} request {n}",
                           "max_tokens": 1000 if long else 8 + (i * 7 + n) % 40, "ignore_eos": True,
                           "temperature": 0.0 if i % 2 else 0.8, "seed": i * 1000 + n})
            except ConnectionError:  # the daemon drained and closed between this worker's requests
                ledger.closed_after_sigterm += 1
                return
            while True:
                frame = await conn.recv(WAIT_S)
                if frame is None:
                    ledger.closed_after_sigterm += 1
                    return
                fid = getattr(frame, "id", None)
                assert fid == cid, f"frame for {fid!r} while {cid!r} is the only live one: {frame}"
                if isinstance(frame, AcceptedFrame):
                    assert cid not in ledger.accepted
                    ledger.accepted[cid] = frame.request_id
                elif isinstance(frame, TokensFrame):
                    assert cid in ledger.accepted
                    ledger.tokens[cid].extend(frame.token_ids)
                elif isinstance(frame, DoneFrame):
                    ledger.ends[cid].append(frame.finish_reason)
                    break
                else:
                    assert isinstance(frame, ErrorFrame), frame
                    if cid in ledger.accepted:
                        ledger.ends[cid].append(frame.code)
                        break
                    assert frame.code in ("shutting_down", "overloaded"), frame
                    ledger.refused[cid] = frame.code
                    if frame.code == "shutting_down":
                        return
                    await asyncio.sleep(0.01)
                    break
            if time.monotonic() > stop_after:
                return
    finally:
        await conn.close()


@dataclass
class SigtermFigures:
    clients: int
    accepted: int
    ends: dict[str, int]
    refused_after_sigterm: int
    exit_s: float
    drain_timeout_s: float
    ring_records: int
    last_step_id: int


def sigterm_under_load(tmp: Path, clients: int = 60, drain_timeout_s: float = 2.0, load_s: float = 1.5,
                       exit_margin_s: float = 3.0) -> SigtermFigures:
    """`clients` workers stream requests; SIGTERM after `load_s`. The daemon
    must exit 0 within drain_timeout_s + exit_margin_s, every accepted
    request must end exactly once, and the ring (read by `overlapd tail`
    from another process) must end with a negated step id and the clean flag."""
    d = serve_real(tmp, "--drain-timeout", str(drain_timeout_s), config="[pipeline]\nmax_waiting = 1024\n")
    tail = JsonLines.tail(d.ring_path, "--from-head")
    ledger = Ledger()
    try:
        async def run() -> float:
            stop_after = time.monotonic() + load_s + drain_timeout_s + 30  # a bound, never reached normally
            tasks = [asyncio.create_task(_worker(str(d.socket_path), i, ledger, stop_after)) for i in range(clients)]
            await asyncio.sleep(load_s)
            assert all(not t.done() for t in tasks), "a worker stopped before SIGTERM"
            t_sig = time.monotonic()
            d.proc.send_signal(signal.SIGTERM)
            await asyncio.wait_for(asyncio.gather(*tasks), drain_timeout_s + WAIT_S)
            return t_sig

        t_sig = asyncio.run(run())
        rc = d.proc.wait(drain_timeout_s + WAIT_S)
        exit_s = time.monotonic() - t_sig  # an upper bound: measured once the clients were done too
        assert rc == 0, d.log()
        assert tail.finish(WAIT_S) == 0, tail.stderr()
    finally:
        tail.kill()
        d.kill()
    assert exit_s < drain_timeout_s + exit_margin_s, f"exit took {exit_s:.2f}s"
    for cid in ledger.accepted:
        assert len(ledger.ends[cid]) == 1, (cid, ledger.ends[cid])
    assert set(ledger.ends) <= set(ledger.accepted)
    steps = [line for _, line in tail.snapshot() if "step_id" in line]
    assert steps and steps[-1]["step_id"] < 0 and all(s["step_id"] > 0 for s in steps[:-1])
    assert ring_header(d.ring_path).flags & FLAG_CLEAN_CLOSE
    _ring_matches_sockets(steps, ledger)
    ends: dict[str, int] = defaultdict(int)
    for v in ledger.ends.values():
        ends[v[0]] += 1
    assert ends["aborted"] > 0 and ends["length"] > 0, dict(ends)  # both drain paths were taken
    return SigtermFigures(clients, len(ledger.accepted), dict(ends), len(ledger.refused), round(exit_s, 2),
                          drain_timeout_s, len(steps), steps[-1]["step_id"])


def _ring_matches_sockets(steps: list[dict], ledger: Ledger) -> None:
    """What each client got is what the ring says (an aborted request's last
    step may reach the ring and not the client: the client's tokens are a prefix)."""
    ring: dict[int, list[int]] = defaultdict(list)
    for s in steps:
        for row in s["rows"]:
            ring[row["request_id"]].extend(row["tokens"])
    for cid, rid in ledger.accepted.items():
        got = ledger.tokens[cid]
        assert ring[rid][: len(got)] == got, cid
        if ledger.ends[cid] == ["length"]:
            assert ring[rid] == got, cid


# ---------------------------------------------------------------- item 5: SIGKILL and restart


@dataclass
class RestartFigures:
    epoch_seen_after_s: float
    restart_ready_s: float
    resynced_rows: int


def sigkill_and_restart(tmp: Path, clients: int = 8) -> RestartFigures:
    """SIGKILL the daemon under load, start a new one on the same socket and
    ring paths: the stale socket file must not stop it, and a live
    `overlapd tail` must print the new epoch within 1 s of the new ring's
    header, then the new daemon's records."""
    a = serve_real(tmp)
    ring = a.ring_path
    tail = JsonLines.tail(ring)
    b: EchoDaemon | None = None
    try:
        streams = [Client(a.socket_path, timeout=WAIT_S) for _ in range(clients)]
        gens = [c.generate(f"doomed {i}", max_tokens=1000, ignore_eos=True) for i, c in enumerate(streams)]
        for g in gens:
            assert isinstance(next(g), AcceptedFrame)
        tail.wait_for(lambda line: "step_id" in line)  # the reader is live on the old epoch
        old_epoch = ring_header(ring).epoch
        a.proc.kill()
        a.proc.wait(10)
        assert a.socket_path.exists(), "a SIGKILLed daemon leaves its socket file behind"
        for c, g in zip(streams, gens):  # the old clients learn it, nobody hangs
            try:
                for _ in range(5000):
                    next(g)
            except (ClientError, StopIteration):
                pass
            c.close()
        t0 = time.monotonic()
        b = serve_real(tmp, wait=False)
        t_epoch = _wait_new_epoch(ring, old_epoch, b)
        b.wait_ready()
        ready_s = time.monotonic() - t0
        t_seen, line = tail.wait_for(lambda line: "event" in line and line["event"] == "epoch", 10)
        assert line["epoch"] == ring_header(ring).epoch != old_epoch
        with b.client() as c:
            done = c.complete("after the restart", max_tokens=5, temperature=0.0, ignore_eos=True)

        def its_last_row(line: dict) -> bool:
            return any(r["request_id"] == done.request_id and r["finish"] for r in line.get("rows", []))

        tail.wait_for(its_last_row)
        after = [ln for t, ln in tail.snapshot() if t >= t_seen and "rows" in ln]
        tokens = [tok for ln in after for r in ln["rows"] if r["request_id"] == done.request_id for tok in r["tokens"]]
        assert tokens == done.token_ids, (tokens, done.token_ids)
    finally:
        tail.kill()
        a.kill()
        if b is not None:
            b.kill()
    latency = t_seen - t_epoch
    assert latency <= 1.0, f"the reader saw the new epoch {latency:.3f}s after it was written"
    return RestartFigures(round(latency, 3), round(ready_s, 2), len(after))


def _wait_new_epoch(ring: Path, old_epoch: int, d: EchoDaemon) -> float:
    """Poll the ring's header until the new producer has written a new epoch;
    when that happened: the header's first heartbeat (written with the
    epoch), or when we saw it if that is earlier."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert d.proc.poll() is None, d.log()
        try:
            h = ring_header(ring)
            if h.epoch not in (old_epoch, 0):
                return min(time.monotonic(), h.heartbeat_s) if h.heartbeat_s > 0 else time.monotonic()
        except (OSError, ValueError):
            pass  # being re-created
        time.sleep(0.002)
    raise AssertionError("the new daemon never wrote a new epoch")


# ---------------------------------------------------------------- item 5: a killed backpressure reader


@dataclass
class EvictionFigures:
    slot_freed_after_s: float
    tokens: int
    readers_evicted: int  # stats' ring_readers_evicted after the kill


def killed_backpressure_reader(tmp: Path, max_tokens: int = 400) -> EvictionFigures:
    """A registered backpressure reader that never reads stops the producer once
    the (small) ring is full; SIGKILL it and the daemon frees its slot and goes on."""
    d = serve_real(tmp, "--ring-backpressure", config="[ring]\ncapacity = 65536\n")
    child = JsonLines.ring_child(d.ring_path, "--backpressure", "--stall", "60", "--max-s", "1")
    try:
        _, ready = child.wait_for(lambda line: "ready" in line)
        assert [s[1] for s in ring_header(d.ring_path).active_slots()] == [ready["ready"]]
        with d.client(timeout=WAIT_S) as c:
            stream = c.generate("fill the ring", max_tokens=max_tokens, ignore_eos=True, logprobs=20)
            got = 0
            stalled_at = None
            for frame in stream:
                if isinstance(frame, TokensFrame):
                    got += len(frame.token_ids)
                    if got >= 50:
                        break
            # The ring fills and the producer waits: no step for a while, the request unfinished.
            steps = d.stats()["steps"]
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                time.sleep(0.3)
                now = d.stats()["steps"]
                if now == steps:
                    stalled_at = time.monotonic()
                    break
                steps = now
            assert stalled_at is not None, "the producer never waited for the stuck reader"
            assert d.stats()["live_requests"] == 1
            child.kill()
            t_kill = time.monotonic()
            deadline = t_kill + 10
            while ring_header(d.ring_path).active_slots() and time.monotonic() < deadline:
                time.sleep(0.01)
            freed_s = time.monotonic() - t_kill
            assert not ring_header(d.ring_path).active_slots(), "the dead reader's slot was never freed"
            for frame in stream:
                if isinstance(frame, TokensFrame):
                    got += len(frame.token_ids)
            assert isinstance(frame, DoneFrame) and frame.finish_reason == "length" and got == max_tokens
        evicted = d.stats()["ring_readers_evicted"]
        assert d.terminate() == 0
    finally:
        child.kill()
        d.kill()
    return EvictionFigures(round(freed_s, 3), got, evicted)
