"""A deliberately slow ring reader against the real daemon (issue 6, item 6).

Default mode: the producer never waits, so steps/s with a slow reader equals
steps/s without one, and the slow reader reports exactly which seqs it lost
(what it got plus what it says it lost is every seq published, once).
Backpressure mode: the slow reader loses nothing and the daemon slows down
to its pace instead; new work is refused with `overloaded` while it waits,
and no client loses a frame.
"""

from __future__ import annotations

import concurrent.futures
import time
from dataclasses import dataclass
from pathlib import Path

from daemon_harness import EchoDaemon, serve_real
from overlapd.daemon.client import Completion, RequestFailed
from ring_probe import JsonLines

SMALL_RING = "[ring]\ncapacity = 65536\n"  # ~40 records of 8 rows with 20 logprobs: laps come quickly
BATCH = 8


@dataclass
class Workload:
    completions: list[Completion]
    steps: int
    seconds: float
    records: tuple[int, int]  # ring_records before and after: the seqs published are [before, after)

    @property
    def steps_per_s(self) -> float:
        return self.steps / self.seconds


def run_workload(d: EchoDaemon, max_tokens: int, tag: str) -> Workload:
    """BATCH concurrent greedy requests with 20 logprobs (big ring records)."""
    before = d.stats()

    def one(i: int) -> Completion:
        with d.client(timeout=60) as c:
            return c.complete(f"{tag} {i}", max_tokens=max_tokens, temperature=0.0, ignore_eos=True, logprobs=20)

    t0 = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(BATCH) as pool:
        done = list(pool.map(one, range(BATCH)))
    seconds = time.monotonic() - t0
    after = d.wait_stats(lambda s: s["live_requests"] == 0)
    for c in done:
        assert c.finish_reason == "length" and len(c.token_ids) == max_tokens, c.finish_reason
    return Workload(done, int(after["steps"] - before["steps"]), seconds,
                    (int(before["ring_records"]), int(after["ring_records"])))


def reader_account(lines: list[dict]) -> tuple[dict[int, dict], list[tuple[int, int]]]:
    """The records a reader printed (by seq) and the lost ranges it reported, in order."""
    got: dict[int, dict] = {}
    lost: list[tuple[int, int]] = []
    expected = None
    for line in lines:
        if "seq" in line:
            assert expected is None or line["seq"] == expected, f"seq {line['seq']} after {expected - 1}, no loss reported"
            assert line["seq"] not in got
            got[line["seq"]] = line
            expected = line["seq"] + 1
        elif "lost" in line:
            first, last = line["lost"]
            assert first <= last and (expected is None or first == expected), (line, expected)
            lost.append((first, last))
            expected = last + 1
    return got, lost


def ring_tokens(records: dict[int, dict]) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for seq in sorted(records):
        for rid, tokens in records[seq]["rows"]:
            out.setdefault(rid, []).extend(tokens)
    return out


@dataclass
class LossyFigures:
    steps_per_s_without: list[float]
    steps_per_s_with: float
    published: int
    delivered: int
    lost_ranges: list[tuple[int, int]]


def slow_reader_default_mode(tmp: Path, max_tokens: int = 200, delay_s: float = 0.03) -> LossyFigures:
    """Steps/s alone, with a slow reader, alone again. A fast reader watches all
    three runs: it costs the same CPU in each, keeps up (the producer has no
    reason to wait for it either), and is the reference for what was published."""
    d = serve_real(tmp, config=SMALL_RING)
    slow = fast = None
    try:
        run_workload(d, 8, "warm")
        fast = JsonLines.ring_child(d.ring_path, "--idle", "60")
        fast.wait_for(lambda line: "ready" in line)
        base1 = run_workload(d, max_tokens, "alone")
        slow = JsonLines.ring_child(d.ring_path, "--delay", str(delay_s), "--idle", "60")
        slow.wait_for(lambda line: "ready" in line)
        loaded = run_workload(d, max_tokens, "watched")
        base2 = run_workload(d, max_tokens, "alone again")
        assert d.terminate() == 0  # the negated last record ends both readers
        assert slow.finish(60) == 0 and fast.finish(60) == 0
    finally:
        for r in (slow, fast):
            if r is not None:
                r.kill()
        d.kill()
    got, lost = reader_account([ln for _, ln in slow.snapshot()])
    published = range(loaded.records[0], max(got) + 1)  # from its start to the last record, negated one included
    assert got[max(got)]["step_id"] < 0, "the slow reader did not reach the last record"
    covered = sorted([*got, *(s for a, b in lost for s in range(a, b + 1))])
    assert covered == list(published), "delivered + reported lost must be every seq published, once"
    assert lost, "the slow reader was never lapped: make the ring smaller or the reader slower"
    ref, ref_lost = reader_account([ln for _, ln in fast.snapshot()])
    for seq, line in got.items():  # every record the slow reader got is intact
        if seq in ref:
            assert line == ref[seq], seq
    if not ref_lost:  # the reference reader saw it all: it matches the sockets
        tokens = ring_tokens(ref)
        for c in loaded.completions + base2.completions:
            assert tokens[c.request_id] == c.token_ids
    return LossyFigures([round(base1.steps_per_s, 1), round(base2.steps_per_s, 1)], round(loaded.steps_per_s, 1),
                        len(published), len(got), lost)


@dataclass
class BackpressureFigures:
    steps_per_s_alone: float
    steps_per_s_paced: float
    reader_records_per_s: float
    published: int
    delivered: int
    extra_overloaded: int
    extra_accepted: int


def slow_reader_backpressure(tmp: Path, max_tokens: int = 100, delay_s: float = 0.03,
                             max_waiting: int = BATCH, extra: int = 2 * BATCH) -> BackpressureFigures:
    d = serve_real(tmp, "--ring-backpressure", "--max-num-seqs", str(BATCH),
                   config=SMALL_RING + f"[pipeline]\nmax_waiting = {max_waiting}\n")
    reader = None
    try:
        run_workload(d, 8, "warm")
        alone = run_workload(d, max_tokens, "alone")
        reader = JsonLines.ring_child(d.ring_path, "--backpressure", "--delay", str(delay_s), "--idle", "3")
        reader.wait_for(lambda line: "ready" in line)
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            paced_f = pool.submit(run_workload, d, max_tokens, "paced")
            time.sleep(0.5)  # the reader holds the producer back by now: more work piles up
            extras = pool.submit(_extra_requests, d, extra)
            paced = paced_f.result()
            overloaded, accepted = extras.result()
        assert reader.finish(60) == 0
        assert d.terminate() == 0
    finally:
        if reader is not None:
            reader.kill()
        d.kill()
    lines = [ln for _, ln in reader.snapshot()]
    got, lost = reader_account(lines)
    assert not lost, f"a backpressure reader lost records: {lost}"
    seqs = sorted(got)
    assert seqs == list(range(seqs[0], seqs[-1] + 1))
    assert set(range(*paced.records)) <= set(seqs), "records published while it read are all there"
    tokens = ring_tokens(got)
    for c in paced.completions:  # and no client lost a frame: socket == ring, every token
        assert tokens[c.request_id] == c.token_ids
    times = [t for t, ln in reader.snapshot() if "seq" in ln]
    rate = (len(times) - 1) / (times[-1] - times[0])
    assert paced.steps_per_s < 0.8 * alone.steps_per_s, (paced.steps_per_s, alone.steps_per_s)
    assert overloaded > 0, "admission never paused"
    return BackpressureFigures(round(alone.steps_per_s, 1), round(paced.steps_per_s, 1), round(rate, 1),
                               len(range(*paced.records)), len(got), overloaded, accepted)


def _extra_requests(d: EchoDaemon, n: int) -> tuple[int, int]:
    """n more requests while the producer waits: the bounded waiting line
    takes a few, the rest are refused `overloaded`; none is lost."""

    def one(i: int) -> str:
        with d.client(timeout=60) as c:
            try:
                c.complete(f"extra {i}", max_tokens=4, temperature=0.0, ignore_eos=True)
            except RequestFailed as exc:
                assert exc.code == "overloaded", exc
                return "overloaded"
            return "accepted"

    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        outcomes = list(pool.map(one, range(n)))
    return outcomes.count("overloaded"), outcomes.count("accepted")
