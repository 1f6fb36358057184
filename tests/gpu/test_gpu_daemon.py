"""The real daemon (`overlapd serve --runtime torch --device gpu`, tiny model,
bfloat16) on a real unix socket, its ring read by `overlapd tail` in another process.

One daemon per mode (overlap, then --no-overlap), each driven through the same
four phases:
1. five clients at once: two greedy, two seeded (top_p, top_k), one greedy with logprobs;
2. two clients at once: a seeded request aborted mid-stream, a short greedy one beside it;
3. a greedy probe, then the same request with one of its tokens as a stop token;
4. one long request, then SIGTERM: the drain lets it finish.
Checked per run: every request ends exactly once, the socket tokens (and
logprobs) equal the ring's, the ring ends with the negated step and `tail`
exits 0, the daemon exits 0. Across runs: both modes give the same tokens.

Why a phase's requests are released together (`frozen`): in bf16 a matmul's
rounding may depend on how many rows share it, and near-tied logits then flip
greedy tokens. Requests trickling in would meet the scheduler in different
batches on each run; queued while the daemon is stopped, they are all read in
one loop iteration and admitted in one step, so both modes run the same
batches and owe the same tokens. The aborted request is phased for the same
reason: when its abort lands is timing, so nothing compared runs beside it then.

OVERLAPD_GPU_TESTS_ON_CPU=1 runs the same test with `--device cpu` (no GPU needed).
"""

from __future__ import annotations

import concurrent.futures
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

# isort: off
from gpu_support import device_params  # first: it puts tests/ on sys.path for daemon_harness
from daemon_harness import EchoDaemon, RawConn, serve_real
# isort: on
from overlapd.daemon.protocol import (
    AcceptedFrame,
    DoneFrame,
    ErrorFrame,
    HealthFrame,
    TokensFrame,
)

ABORT_AFTER = 16  # tokens the aborted request streams before its client aborts it
# A request aborted between postprocess and emit still has that step's token in
# the ring (emit writes rows computed before the abort); at most a few steps' worth.
ABORT_RING_SLACK = 4
DRAIN_TOKENS = 200
RING_FINISH = {"eos": 1, "stop": 2, "length": 3}

PHASE1: dict[str, dict[str, Any]] = {
    "greedy_long": {"prompt": "The quick brown fox", "max_tokens": 40, "temperature": 0.0, "ignore_eos": True},
    "greedy_short": {"prompt": "Once upon a time", "max_tokens": 24, "temperature": 0.0, "ignore_eos": True},
    "seeded_top_p": {"prompt": "In a small village", "max_tokens": 32, "temperature": 0.8, "top_p": 0.9,
                     "seed": 7, "ignore_eos": True},
    "seeded_top_k": {"prompt": "Hello hello", "max_tokens": 28, "temperature": 1.0, "top_k": 40, "seed": 11,
                     "ignore_eos": True},
    "logprobs": {"prompt": "Numbers and words", "max_tokens": 20, "temperature": 0.0, "logprobs": 3,
                 "ignore_eos": True},
}
PHASE2: dict[str, dict[str, Any]] = {
    "aborted": {"prompt": "abort me please", "max_tokens": 400, "temperature": 0.9, "seed": 5, "ignore_eos": True},
    "beside_abort": {"prompt": "beside", "max_tokens": 8, "temperature": 0.0, "ignore_eos": True},
}
PROBE: dict[str, Any] = {"prompt": "Tell me a story", "max_tokens": 16, "temperature": 0.0}  # eos may end it
DRAIN: dict[str, Any] = {"prompt": "drain", "max_tokens": DRAIN_TOKENS, "temperature": 0.0, "ignore_eos": True}


@dataclass
class Seen:
    """One request as its client saw it on the socket."""

    name: str
    params: dict[str, Any]
    request_id: int | None = None
    tokens: list[int] = field(default_factory=list)
    logprobs: list[Any] = field(default_factory=list)
    ends: list[tuple[str, int]] = field(default_factory=list)  # (finish reason or error code, completion tokens)
    abort_sent: bool = False


class Conn:
    """One client connection; every frame it ever gets is recorded by request id."""

    def __init__(self, path: Path) -> None:
        # Generous: a GPU daemon's first steps may JIT-compile its Triton kernels.
        self.raw = RawConn(path, timeout=120)
        self.seen: dict[str, Seen] = {}
        self.stray: list[Any] = []  # frames naming no request of ours

    def ping(self) -> None:
        """A round trip, so the daemon has accepted us before it is stopped."""
        self.raw.send({"type": "health"})
        assert isinstance(self.raw.recv(), HealthFrame)

    def send(self, name: str, params: dict[str, Any]) -> None:
        self.seen[name] = Seen(name, params)
        self.raw.send({"type": "generate", "id": name, **params})

    def read_until_end(self, name: str, on_tokens: Callable[[Conn, Seen], None] | None = None) -> Seen:
        s = self.seen[name]
        while not s.ends:
            frame = self.raw.recv()
            assert frame is not None, f"{name}: connection closed before the request ended"
            self._record(frame)
            if on_tokens is not None and isinstance(frame, TokensFrame):
                on_tokens(self, s)
        return s

    def read_to_eof(self) -> None:
        """After the daemon exited: anything still unread (a second end would show here)."""
        while (frame := self.raw.recv()) is not None:
            self._record(frame)
        self.raw.close()

    def _record(self, frame: Any) -> None:
        s = self.seen.get(getattr(frame, "id", None) or "")
        if s is None:
            self.stray.append(frame)
        elif isinstance(frame, AcceptedFrame):
            assert s.request_id is None and not s.tokens, f"{s.name}: accepted twice or late"
            s.request_id = frame.request_id
        elif isinstance(frame, TokensFrame):
            assert not s.ends, f"{s.name}: tokens after its end"
            s.tokens += frame.token_ids
            s.logprobs += frame.logprobs or []
        elif isinstance(frame, DoneFrame):
            s.ends.append((frame.finish_reason, frame.usage.completion_tokens))
        elif isinstance(frame, ErrorFrame):
            s.ends.append((f"error:{frame.code}:{frame.message}", -1))
        else:
            self.stray.append(frame)


def _all_stopped(pid: int) -> bool:
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            state = (task / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            continue  # a thread that just ended
        if state not in ("T", "t"):
            return False
    return True


@contextmanager
def frozen(d: EchoDaemon) -> Iterator[None]:
    """The daemon stopped (every thread) while the body runs; resumed after, whatever happens."""
    pid = d.proc.pid
    os.kill(pid, signal.SIGSTOP)
    try:
        deadline = time.monotonic() + 5
        while not _all_stopped(pid):
            assert time.monotonic() < deadline, "the daemon did not stop on SIGSTOP"
            time.sleep(0.001)
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def run_phase(d: EchoDaemon, requests: dict[str, dict[str, Any]], conns: list[Conn],
              on_tokens: Callable[[Conn, Seen], None] | None = None) -> dict[str, Seen]:
    """One client per request, all sent while the daemon is stopped, read concurrently."""
    mine = {name: Conn(d.socket_path) for name in requests}
    conns += mine.values()
    for c in mine.values():
        c.ping()
    with frozen(d):
        for name, c in mine.items():
            c.send(name, requests[name])
    with concurrent.futures.ThreadPoolExecutor(len(mine)) as pool:
        futures = {name: pool.submit(c.read_until_end, name, on_tokens) for name, c in mine.items()}
        return {name: f.result() for name, f in futures.items()}


def abort_midway(conn: Conn, s: Seen) -> None:
    if s.name == "aborted" and len(s.tokens) >= ABORT_AFTER and not s.abort_sent:
        s.abort_sent = True
        conn.raw.send({"type": "abort", "id": s.name})


def pick_stop_token(tokens: list[int], finish: str) -> int | None:
    """A token first seen at index >= 3 (so the stop lands mid-stream), never the eos that ended it."""
    last = len(tokens) - 1 if finish == "eos" else len(tokens)
    for i in range(3, last):
        if tokens[i] not in tokens[:i]:
            return tokens[i]
    return None


@dataclass
class RingRow:
    tokens: list[int] = field(default_factory=list)
    finish: list[int] = field(default_factory=list)  # per row the request appeared in
    logprobs: list[float] = field(default_factory=list)
    ranks: list[int] = field(default_factory=list)
    top: list[list[list[float]]] = field(default_factory=list)
    first_seq: int = -1  # the ring record of the request's first token


@dataclass
class Run:
    seen: dict[str, Seen]
    ring: dict[int, RingRow]
    tail_lines: list[dict[str, Any]]
    tail_rc: int
    daemon_rc: int
    drain_live: int
    stop_token: int | None
    strays: list[Any]
    graph_replays: int  # stats before the drain: decode steps replayed from CUDA graphs


def read_tail(path: Path) -> tuple[dict[int, RingRow], list[dict[str, Any]]]:
    lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    ring: dict[int, RingRow] = {}
    for line in lines:
        for row in line.get("rows", []):
            r = ring.setdefault(row["request_id"], RingRow(first_seq=line["seq"]))
            r.tokens += row["tokens"]
            r.finish.append(row["finish"])
            r.logprobs += row.get("logprobs", [])
            r.ranks += row.get("ranks", [])
            r.top += row.get("top", [])
    return ring, lines


def serve_and_drive(tmp: Path, device: str, *flags: str) -> Run:
    d = serve_real(tmp, "--runtime", "torch", "--device", device, "--dtype", "bfloat16", "--max-num-seqs", "8",
                   "--max-model-len", "512", "--drain-timeout", "30", *flags)
    tail_path = tmp / "tail.jsonl"
    with tail_path.open("wb") as tail_out:
        tail = subprocess.Popen([sys.executable, "-m", "overlapd.daemon", "tail", str(d.ring_path), "--from-head"],
                                stdout=tail_out, stderr=subprocess.PIPE)
    conns: list[Conn] = []
    try:
        seen = run_phase(d, PHASE1, conns)
        seen |= run_phase(d, PHASE2, conns, abort_midway)
        seen |= run_phase(d, {"probe": PROBE}, conns)
        probe = seen["probe"]
        stop = pick_stop_token(probe.tokens, probe.ends[0][0])
        # No fresh token to stop on: a stop token the probe never emits, so it ends as the probe did.
        stop_ids = [stop] if stop is not None else [next(t for t in range(3, 1000) if t not in probe.tokens)]
        seen |= run_phase(d, {"stopped": dict(PROBE, stop_token_ids=stop_ids)}, conns)
        graph_replays = int(d.stats()["graph_replays"])

        c = Conn(d.socket_path)
        conns.append(c)
        c.send("drain", DRAIN)
        sent = False

        def sigterm_once(conn: Conn, s: Seen) -> None:
            nonlocal sent
            if not sent:
                sent = True
                d.proc.send_signal(signal.SIGTERM)

        seen["drain"] = c.read_until_end("drain", sigterm_once)
        daemon_rc = d.proc.wait(60)
        for c in conns:
            c.read_to_eof()
        tail_rc = tail.wait(30)
    finally:
        d.kill()
        if tail.poll() is None:
            tail.kill()
            tail.wait(5)
        for c in conns:
            c.raw.close()
    assert tail.stderr is not None
    tail_err = tail.stderr.read().decode(errors="replace")
    tail.stderr.close()
    assert tail_rc == 0, f"overlapd tail exited {tail_rc}: {tail_err}"
    drain_live = [json.loads(x).get("live", -1) for x in d.log_path.read_text().splitlines()
                  if x.startswith("{") and '"event": "draining"' in x]
    ring, lines = read_tail(tail_path)
    return Run(seen, ring, lines, tail_rc, daemon_rc, drain_live[0] if drain_live else -1, stop,
               [f for c in conns for f in c.stray], graph_replays)


def check_run(r: Run, label: str) -> None:
    """What one daemon run owes on its own."""
    assert r.daemon_rc == 0, f"{label}: daemon exit {r.daemon_rc}"
    assert r.drain_live >= 1, f"{label}: SIGTERM found nothing live to drain (drain live={r.drain_live})"
    assert not r.strays, f"{label}: frames for no request: {r.strays[:5]}"
    events = [x for x in r.tail_lines if "event" in x]
    assert not [e for e in events if e["event"] in ("lost", "producer_gone")], f"{label}: {events}"
    steps = [x for x in r.tail_lines if "seq" in x]
    assert [x["seq"] for x in steps] == list(range(steps[0]["seq"], steps[0]["seq"] + len(steps))), "ring seq gap"
    assert steps[-1]["step_id"] < 0 and all(x["step_id"] > 0 for x in steps[:-1]), f"{label}: no negated last step"

    # The gate worked: a phase's requests ran together (prompts are tokenized on
    # a thread pool, so admission can spread over a step or two; every request
    # must still be running when the phase's last one starts).
    for phase in (PHASE1, PHASE2):
        firsts = {name: r.ring[r.seen[name].request_id].first_seq for name in phase}
        ends = {name: firsts[name] + len(r.seen[name].tokens) for name in phase}
        assert max(firsts.values()) < min(ends.values()), f"{label}: a phase did not run together: {firsts} {ends}"

    for name, s in r.seen.items():
        assert len(s.ends) == 1, f"{label} {name}: ended {len(s.ends)} times: {s.ends}"
        reason, completion = s.ends[0]
        assert s.request_id is not None, f"{label} {name}: never accepted"
        assert completion == len(s.tokens), f"{label} {name}: usage {completion} vs {len(s.tokens)} streamed"
        ring = r.ring.get(s.request_id, RingRow())
        if name == "aborted":
            assert reason == "aborted" and len(s.tokens) >= ABORT_AFTER, (label, s.ends, len(s.tokens))
            assert ring.tokens[: len(s.tokens)] == s.tokens, f"{label}: aborted request's ring tokens differ"
            assert len(ring.tokens) - len(s.tokens) <= ABORT_RING_SLACK, (label, len(ring.tokens), len(s.tokens))
            assert not any(ring.finish), f"{label}: an aborted request has a finish row in the ring"
            continue
        assert ring.tokens == s.tokens, f"{label} {name}: ring {ring.tokens} != socket {s.tokens}"
        assert reason in RING_FINISH, f"{label} {name}: {reason}"
        assert ring.finish[-1] == RING_FINISH[reason] and not any(ring.finish[:-1]), (label, name, ring.finish)
        p = s.params
        if p.get("ignore_eos"):
            assert reason == "length" and len(s.tokens) == p["max_tokens"], (label, name, reason, len(s.tokens))

    lp = r.seen["logprobs"]
    ring = r.ring[lp.request_id]
    assert [x.token_id for x in lp.logprobs] == lp.tokens and len(ring.logprobs) == len(lp.tokens)
    assert [x.rank for x in lp.logprobs] == ring.ranks
    for x, ring_lp, ring_top in zip(lp.logprobs, ring.logprobs, ring.top):
        assert math.isclose(x.logprob, ring_lp, rel_tol=1e-6, abs_tol=1e-6)
        assert len(x.top) == 3 and [t[0] for t in x.top] == [t[0] for t in ring_top]
        assert all(math.isclose(a[1], b[1], rel_tol=1e-6, abs_tol=1e-6) for a, b in zip(x.top, ring_top))
        assert x.logprob <= 0 and (x.rank != 1 or x.token_id == x.top[0][0])

    probe, stopped = r.seen["probe"], r.seen["stopped"]
    if r.stop_token is not None:
        cut = probe.tokens.index(r.stop_token) + 1
        assert stopped.ends[0][0] == "stop" and stopped.tokens == probe.tokens[:cut], (label, probe.tokens,
                                                                                       stopped.tokens)
    else:
        assert stopped.tokens == probe.tokens and stopped.ends[0][0] == probe.ends[0][0]
    assert len({tuple(r.seen[n].tokens) for n in PHASE1}) == len(PHASE1), f"{label}: degenerate streams"


@pytest.mark.parametrize("device", device_params())
def test_real_daemon_serves_concurrent_clients_matches_the_ring_and_both_modes(device, tmp_path):
    t0 = time.monotonic()
    runs = {}
    for label, flags in (("overlap", ()), ("sync", ("--no-overlap",))):
        (tmp_path / label).mkdir()
        runs[label] = serve_and_drive(tmp_path / label, device, *flags)
        check_run(runs[label], label)
        # the daemon really replays decode steps from CUDA graphs on a GPU (none on the CPU)
        assert (runs[label].graph_replays > 0) == (device == "gpu"), (label, runs[label].graph_replays)
    ovl, sync = runs["overlap"].seen, runs["sync"].seen
    assert runs["overlap"].stop_token == runs["sync"].stop_token
    for name in ovl:
        a, b = ovl[name].tokens, sync[name].tokens
        if name == "aborted":  # where the abort lands is timing: compare what both streamed
            n = min(len(a), len(b))
            assert a[:n] == b[:n], f"aborted: overlap {a[:n]} != sync {b[:n]}"
        else:
            assert a == b, f"{name}: overlap {a} != sync {b}"
            assert ovl[name].ends[0][0] == sync[name].ends[0][0], name
    a, b = ovl["logprobs"].logprobs, sync["logprobs"].logprobs
    assert [(x.rank, [t[0] for t in x.top]) for x in a] == [(x.rank, [t[0] for t in x.top]) for x in b]
    assert all(math.isclose(x.logprob, y.logprob, rel_tol=1e-5, abs_tol=1e-5) for x, y in zip(a, b))
    print(f"\n{device}: stop token {runs['overlap'].stop_token}; aborted after "
          f"{len(ovl['aborted'].tokens)}/{len(sync['aborted'].tokens)} tokens; drain live "
          f"{runs['overlap'].drain_live}/{runs['sync'].drain_live}; {time.monotonic() - t0:.1f} s")
