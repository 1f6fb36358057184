"""Continuous batching: which requests run in the next step, and how many tokens each.

Every step has a token budget (`max_num_batched_tokens`) and a row budget
(`max_num_seqs`, also the bound on running requests: each holds a persistent
row in the runner). A step is filled in three passes, always in arrival
order within a pass so that decisions never depend on dict or set order:

1. running requests that need one token (decodes),
2. running requests still in their prompt (chunked prefill continues),
3. waiting requests, first come first served; admission stops at the first
   one that does not fit and never happens in a step that preempted.

KV blocks are taken on demand. When a request cannot get even one position,
the latest-arrived running request is preempted (its blocks freed, its state
reset, back into the waiting queue by arrival) and recomputes prompt +
outputs when it is admitted again.

Prefix caching (stages/kv/prefix_cache.py): a request admitted from the
waiting queue starts with the cached blocks that match its leading full
blocks and computes from the first block boundary after them, and never its
whole sequence: its last token is always computed, for the logits. A block is
keyed once every position in it is scheduled and its tokens are known, at
the end of the schedule() that completed it, so no one shares it in the step
that writes it; steps run in order on the device, so any later step reads it
written. It is never written again: every later write of its request lands
after the computed positions.

Overlap: schedule() may run before the previous step's outputs are known; a
sampling row leaves a placeholder output on its request, which the next
schedule() decodes with `from_prev_step=True` (updates.py turns placeholders
into tokens).

Speculative decoding (`spec`, stages/spec/planner.py): in pass 1 a
speculating request's decode row may carry drafts after its last token (a
verify row, KV slots for all of them); updates.py keeps the tokens the
device accepted.

The request bookkeeping this policy acts on is state.py's; applying a step's
outputs is updates.py's.
"""

from __future__ import annotations

from typing import Any, Sequence

from ..engine.config import EngineConfig
from ..kv.sequence_blocks import cache_full_blocks, cached_prefix
from ..request import Request, RequestStatus
from ..step_types import ScheduledRow, SchedulerOutput
from .updates import StepUpdates


class Scheduler(StepUpdates):
    def __init__(self, cfg: EngineConfig, **state: Any) -> None:
        """`state`: SchedulerState's keywords (num_blocks, max_model_len, ...)."""
        super().__init__(cfg, **state)
        self._to_key: list[Request] = []  # rows of this schedule() that completed a block

    def schedule(self) -> SchedulerOutput:
        """The next step. Empty (step_id 0, no rows) when nothing can run now.

        An empty output is not a step: it takes no step id and hands out no
        freed ids; those wait for the next step that has rows.
        """
        cfg = self.cfg
        step_id = self._step_id + 1
        budget = cfg.max_num_batched_tokens
        rows: list[ScheduledRow] = []
        scheduled: set[int] = set()
        preempted = False
        # Drafts only take budget that every running request's decode leaves.
        spare = budget - len(self.running)
        if self.spec is not None:
            self.spec.begin_step(self.running)

        # Pass 1: decodes. A victim is never a row already in this step: it
        # is a request whose last output is in flight, or one later in
        # arrival order, which this pass has not reached yet.
        for req in list(self.running):
            if req.status is not RequestStatus.RUNNING:
                continue  # preempted for an earlier decode
            drafts: list[int] = []
            chained_index: int | None = None  # a chained row's output index (spec/planner.py)
            if self.spec is not None and self.spec.waits(req):
                chain = self.spec.chain(req, step_id, spare, self.max_model_len - req.num_computed_tokens - 1)
                if chain is None:
                    continue  # its row in flight must come home first
                drafts, chained_index = chain
            elif req.num_tokens_to_compute != 1 or req.num_outputs >= req.params.max_tokens:
                continue  # a prefill (pass 2), or its last output is already in flight
            elif self.spec is not None:
                drafts = self.spec.drafts(req, spare)
            n, did_preempt = self._make_room(req, 1 + len(drafts), scheduled, allow_self=True)
            preempted |= did_preempt
            if req.status is not RequestStatus.RUNNING:
                continue  # it preempted itself: it was the latest
            drafts = drafts[: n - 1]  # as many as found KV room
            spare -= len(drafts)
            rows.append(self._row(req, n, step_id, drafts, chained_index))
            scheduled.add(req.req_id)
            budget -= n

        # Pass 2: prompts already started continue (chunked prefill).
        for req in list(self.running):
            if budget <= 0:
                break
            if req.req_id in scheduled or req.status is not RequestStatus.RUNNING:
                continue
            # an output in flight: the sequence to continue is not known (a
            # chained row's placeholder can leave more than one position to compute)
            if req.num_tokens_to_compute <= 1 or req.num_placeholders:
                continue
            n, did_preempt = self._make_room(req, min(req.num_tokens_to_compute, budget), scheduled, allow_self=False)
            preempted |= did_preempt
            if n == 0:
                continue
            rows.append(self._row(req, n, step_id))
            scheduled.add(req.req_id)
            budget -= n

        # Pass 3: admission, first come first served.
        if not preempted:
            budget = self._admit(rows, budget, step_id)

        for req in self._to_key:
            cache_full_blocks(self.block_manager, req)
        self._to_key.clear()
        if not rows:
            return SchedulerOutput(step_id=0, rows=[])
        self._step_id = step_id
        freed, self._freed = self._freed, []
        return SchedulerOutput(step_id=step_id, rows=rows, freed_req_ids=freed)

    def _admit(self, rows: list[ScheduledRow], budget: int, step_id: int) -> int:
        chunked = self.cfg.enable_chunked_prefill
        bm = self.block_manager
        while self.waiting and budget > 0 and len(self.running) < self.cfg.max_num_seqs:
            req = self.waiting[0]
            # Its last output is still in flight (preempted in overlap mode):
            # the sequence to recompute is not known yet.
            if req.num_placeholders:
                break
            # all of its tokens are known: it waits above while any is in flight
            hits = cached_prefix(bm, req) if self._caching else []
            skip = len(hits) * bm.block_size
            to_compute = req.num_tokens - skip
            n = min(to_compute, budget, bm.tokens_that_fit_after(hits))
            if n == 0 or (not chunked and n < to_compute):
                break
            self.waiting.popleft()
            req.status = RequestStatus.RUNNING
            self._insert_by_arrival(self.running, req)
            self.prefix_queried_tokens += req.num_tokens
            if self._caching:
                req.block_ids = bm.take(hits)
                req.num_keyed_blocks = len(hits)
                req.num_computed_tokens = skip
                self.prefix_hit_tokens += skip
            bm.grow(req.block_ids, skip + n)
            rows.append(self._row(req, n, step_id))
            budget -= n
        return budget

    def _make_room(self, req: Request, want: int, scheduled: set[int], *, allow_self: bool) -> tuple[int, bool]:
        """Allocate blocks for up to `want` new positions of `req`; (positions got, preempted?).

        Preempts only when not a single position fits: a request whose last
        output is in flight, else one that arrived later than `req` and is not
        in this step (or `req` itself, for a decode, when it is the latest).
        """
        bm = self.block_manager
        preempted = False
        fit = bm.tokens_that_fit(req.block_ids, req.num_computed_tokens)
        while fit == 0:
            victim = self._pick_victim(req, scheduled, allow_self)
            if victim is None:
                return 0, preempted
            self._preempt(victim)
            preempted = True
            if victim is req:
                return 0, preempted
            fit = bm.tokens_that_fit(req.block_ids, req.num_computed_tokens)
        n = min(want, fit)
        bm.grow(req.block_ids, req.num_computed_tokens + n)
        return n, preempted

    def _pick_victim(self, req: Request, scheduled: set[int], allow_self: bool) -> Request | None:
        # First a request whose every remaining output is already in flight
        # (overlap mode): it leaves at its next update anyway, so preempting
        # it costs no recompute and sync mode would not have had it at all.
        for r in reversed(self.running):
            if r is not req and r.req_id not in scheduled and r.num_outputs >= r.params.max_tokens:
                return r
        for r in reversed(self.running):
            if r is req:
                return r if allow_self else None
            if r.req_id not in scheduled:
                return r
        return None

    def _row(self, req: Request, n: int, step_id: int, drafts: Sequence[int] = (),
             chained_index: int | None = None) -> ScheduledRow:
        """`chained_index`: a row chained on the request's row in flight
        (spec/planner.py): its first token is that row's last, on the device,
        and its first output has this index."""
        start = req.num_computed_tokens
        known = n - len(drafts)  # drafts follow the request's known tokens (a verify row)
        if chained_index is not None:
            token_ids, sample = [-1], True
        else:
            token_ids = req.token_ids_slice(start, start + known)
            sample = start + known == req.num_tokens
        from_prev = token_ids[-1] == -1
        token_ids.extend(drafts)
        if from_prev:
            # Only the newest token can be in flight, and only from the step
            # just before: that is where the runner reads it from.
            if known != 1 or req.last_sample_step != step_id - 1:
                raise RuntimeError(f"{req}: in-flight input token not from the previous step")
        # For a prefill chunk that does not sample, the index its request's
        # next sample will have: the runner seeds a new row's sampling stream
        # from (seed, output_index), also when it resumes after preemption.
        output_index = req.num_outputs if chained_index is None else chained_index
        req.num_computed_tokens += n
        if start < req.num_prompt_tokens:
            self.prompt_tokens_computed += min(start + n, req.num_prompt_tokens) - start
        if self._caching and req.num_computed_tokens >= (req.num_keyed_blocks + 1) * self.cfg.block_size:
            self._to_key.append(req)  # keyed when this step is complete, never shared within it
        if sample:
            req.num_placeholders += 1
            req.last_sample_step = step_id
        row = ScheduledRow(
            req_id=req.req_id,
            token_ids=token_ids,
            start_pos=start,
            from_prev_step=from_prev,
            sample=sample,
            output_index=output_index,
            block_ids=list(req.block_ids),  # a snapshot: later steps grow the request's table
            params=req.params,
            seed=req.seed,
            stops=req.stops,
            num_drafts=len(drafts),
        )
        if sample and self.spec is not None and self.spec.speculates(req):
            self.spec.planned(req, row, step_id)
        return row
