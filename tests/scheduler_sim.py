"""A tiny stand-in device for scheduler tests: real paged KV bookkeeping, hash 'model'.

The device keeps a paged cache of token ids addressed exactly as the real
runner addresses KV (block table + position), and its "model" samples the
next token as a hash of the whole sequence read back through the block
table, plus the row's seed and output index. With the prefix cache on, a row
may read positions another request wrote (a shared block); what it reads is
still the token sequence, so a wrong share changes the tokens too. So any scheduling mistake
(wrong block table, lost token, stale KV after preemption, a placeholder fed
from the wrong step) changes the tokens, and `reference_tokens` gives what an
unconstrained run must produce. This is test input, not a mock: the
scheduler under test is the real one.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
from overlapd.stages.scheduling import SampledToken, Scheduler
from overlapd.stages.step_types import FinishReason, SamplingParams, SchedulerOutput, StepOutput

EMPTY = -2


def next_token(seq: list[int], seed: int, output_index: int, vocab_size: int, greedy: bool) -> int:
    h = hashlib.blake2b(np.asarray(seq, dtype=np.int64).tobytes(), digest_size=8)
    if not greedy:  # seeded sampling: the seed and the output index matter too
        h.update(seed.to_bytes(8, "little") + output_index.to_bytes(4, "little"))
    return int.from_bytes(h.digest(), "little") % vocab_size


class SimDevice:
    def __init__(self, num_blocks: int, block_size: int, vocab_size: int, shared_reads: bool = False) -> None:
        self.block_size = block_size
        self.shared_reads = shared_reads  # the prefix cache is on: reading another request's KV is allowed
        self.vocab_size = vocab_size
        self.kv = np.full((num_blocks, block_size), EMPTY, dtype=np.int64)
        self.owner = np.full((num_blocks, block_size), -1, dtype=np.int64)
        self._prev: dict[int, int] = {}  # req_id -> token it sampled in the previous run

    def run(self, so: SchedulerOutput) -> StepOutput:
        bs = self.block_size
        n = len(so.rows)
        sampled = np.zeros(n, dtype=np.int32)
        prev: dict[int, int] = {}
        for i, row in enumerate(so.rows):
            toks = row.token_ids
            if row.from_prev_step:
                assert toks == [-1]
                toks = [self._prev[row.req_id]]
            assert -1 not in toks
            for j, t in enumerate(toks):
                p = row.start_pos + j
                b = row.block_ids[p // bs]
                self.kv[b, p % bs] = t
                self.owner[b, p % bs] = row.req_id
            if row.sample:
                end = row.start_pos + len(toks)
                seq = []
                for p in range(end):
                    b = row.block_ids[p // bs]
                    if not self.shared_reads:
                        assert self.owner[b, p % bs] == row.req_id, f"row {row.req_id} reads KV it did not write"
                    assert self.kv[b, p % bs] != EMPTY, f"row {row.req_id} reads a position nobody wrote"
                    seq.append(int(self.kv[b, p % bs]))
                greedy = row.params.temperature == 0
                sampled[i] = next_token(seq, row.seed, row.output_index, self.vocab_size, greedy)
                prev[row.req_id] = int(sampled[i])
        self._prev = prev
        return StepOutput(
            step_id=so.step_id,
            req_ids=np.array([r.req_id for r in so.rows], dtype=np.uint64),
            sampled=sampled,
            k=0,
            logprobs=None,
            top_ids=None,
            ranks=None,
        )


def reference_tokens(
    prompt: list[int], params: SamplingParams, seed: int, vocab_size: int, eos: set[int]
) -> tuple[list[int], FinishReason]:
    """What one request must produce alone, with no cache at all."""
    seq = list(prompt)
    out: list[int] = []
    while True:
        t = next_token(seq, seed, len(out), vocab_size, params.temperature == 0)
        out.append(t)
        seq.append(t)
        if not params.ignore_eos and t in eos:
            return out, FinishReason.EOS
        if t in params.stop_token_ids:
            return out, FinishReason.STOP
        if len(out) >= params.max_tokens:
            return out, FinishReason.LENGTH


@dataclass
class RunLog:
    tokens: dict[int, list[int]] = field(default_factory=dict)
    finish: dict[int, FinishReason] = field(default_factory=dict)
    steps: list[SchedulerOutput] = field(default_factory=list)

    def record(self, accepted: list[SampledToken]) -> None:
        for t in accepted:
            self.tokens.setdefault(t.req_id, []).append(t.token_id)
            if t.finish_reason is not None:
                self.finish[t.req_id] = t.finish_reason


def check_step(sched: Scheduler, so: SchedulerOutput) -> None:
    """Invariants every scheduled step must hold."""
    cfg = sched.cfg
    assert so.num_tokens <= cfg.max_num_batched_tokens
    assert len(so.rows) <= cfg.max_num_seqs
    ids = [r.req_id for r in so.rows]
    assert len(ids) == len(set(ids)), "a request twice in one step"
    bm = sched.block_manager
    for r in so.rows:  # freed and scheduled again only as a fresh start (runner frees first), after any cached prefix
        assert r.req_id not in so.freed_req_ids or r.start_pos == 0 or (
            bm.prefix_cache is not None and r.start_pos % cfg.block_size == 0)
        # the blocks a row writes are its own: a shared (cached) block is never written
        first, last = r.start_pos // cfg.block_size, (r.start_pos + r.num_tokens - 1) // cfg.block_size
        for b in r.block_ids[first: last + 1]:
            assert bm.ref_count(b) == 1, f"request {r.req_id} writes block {b}, held {bm.ref_count(b)} times"
    assert len(sched.running) <= cfg.max_num_seqs
    in_rows = {r.req_id for r in so.rows}
    for r in sched.running:  # decodes first: only prefills and finished-in-flight ones may wait
        if r.req_id not in in_rows:
            assert r.num_tokens_to_compute > 1 or r.num_outputs >= r.params.max_tokens, f"decode skipped: {r}"
    for r in so.rows:
        assert r.num_tokens >= 1
        assert len(r.block_ids) * cfg.block_size >= r.start_pos + r.num_tokens
        if r.sample:
            assert r.output_index < r.params.max_tokens, "a row would sample past max_tokens"
    check_blocks(sched)


def check_blocks(sched: Scheduler) -> None:
    bm = sched.block_manager
    bm.check()
    held = [b for r in sched.running for b in r.block_ids]
    for r in sched.running:
        assert len(r.block_ids) == len(set(r.block_ids)), f"a block twice in {r}'s table"
    counts: dict[int, int] = {}
    for b in held:
        counts[b] = counts.get(b, 0) + 1
    if bm.prefix_cache is None:
        assert len(held) == len(set(held)), "a block owned twice"
    for b, n in counts.items():
        assert bm.ref_count(b) == n, f"block {b}: {n} tables hold it, its count says {bm.ref_count(b)}"
        assert n == 1 or bm.prefix_cache.is_cached(b), f"block {b} is shared but not cached"
    assert len(counts) == bm.num_used_blocks, "blocks leaked or double counted"
    assert bm.num_used_blocks + bm.num_free_blocks + bm.num_evictable_blocks == bm.num_blocks
    assert all(not r.block_ids for r in sched.waiting)


def run_sync(sched: Scheduler, dev: SimDevice, max_iters: int = 100_000, between=None, min_iters: int = 0) -> RunLog:
    log = RunLog()
    for it in range(max_iters):
        if between is not None:
            between(it)
        if not sched.has_work() and it >= min_iters:
            return log
        so = sched.schedule()
        if so.is_empty:
            continue
        check_step(sched, so)
        log.steps.append(so)
        log.record(sched.update(so, dev.run(so)))
        check_blocks(sched)
    raise AssertionError("sync run did not finish")


def run_overlap(
    sched: Scheduler,
    dev: SimDevice,
    max_iters: int = 100_000,
    between=None,
    min_iters: int = 0,
    in_flight: tuple[SchedulerOutput, StepOutput] | None = None,
) -> RunLog:
    """One step in flight: schedule and launch N+1 before applying N's outputs.

    `in_flight` continues a run a test drove by hand up to some step.
    """
    log = RunLog()
    for it in range(max_iters):
        if between is not None:
            between(it)
        if not sched.has_work() and in_flight is None and it >= min_iters:
            return log
        so = sched.schedule()
        launched = None
        if not so.is_empty:
            check_step(sched, so)
            log.steps.append(so)
            launched = (so, dev.run(so))
        if in_flight is not None:
            log.record(sched.update(*in_flight))
            check_blocks(sched)
        in_flight = launched
    raise AssertionError("overlap run did not finish")
