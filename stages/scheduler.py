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

Overlap: schedule() may run before the previous step's outputs are known.
Each sampling row leaves a placeholder output on its request (its KV position
advances), so the next schedule() can decode it with `from_prev_step=True`.
update() turns placeholders into tokens in step order and applies the
token-level stop conditions (the device's verdict where the step carries
one). Sync mode runs the same code with update() between schedules, so both
modes make the same decisions wherever the outputs they know are the same.

Speculative decoding (`spec`, stages/spec/planner.py): in pass 1 a
speculating request's decode row may carry drafts after its last token (a
verify row, KV slots for all of them); update() appends the tokens the device
accepted and the planner trims the rest.
"""

from __future__ import annotations

import bisect
import random
from collections import deque
from dataclasses import dataclass
from typing import Iterable, Sequence

from .kv.block_manager import BlockManager
from .kv.prefix_cache import cache_salt
from .kv.sequence_blocks import cache_full_blocks, cached_prefix
from .engine_config import EngineConfig
from .request import (
    U64_MAX,
    InvalidRequest,
    Request,
    RequestStatus,
    device_stop_reason,
    token_stop_reason,
    token_stops,
    validate_fits_cache,
    validate_request,
)
from .spec.planner import SpecPlanner
from .step_types import (
    FinishReason,
    SamplingParams,
    ScheduledRow,
    SchedulerOutput,
    StepOutput,
)


class SchedulerFull(RuntimeError):
    """The waiting queue is at its bound; the caller should answer `overloaded`."""


@dataclass(frozen=True, slots=True)
class SchedulerStats:
    num_waiting: int
    num_running: int
    num_blocks_used: int
    num_blocks_free: int
    num_preemptions: int
    num_steps: int
    num_blocks_evictable: int  # cached, held by nobody: counted neither used nor free
    num_blocks_cached: int  # holding a cached prefix, held or evictable
    prefix_queried_tokens: int  # tokens of every sequence admitted from the waiting queue
    prefix_hit_tokens: int  # of those, found in the prefix cache instead of computed
    prompt_tokens_computed: int  # prompt positions actually computed (recomputes included)


@dataclass(frozen=True, slots=True)
class SampledToken:
    """One output token that update() accepted (discarded ones never appear)."""

    request: Request
    req_id: int
    row_index: int  # row in the SchedulerOutput / StepOutput it came from
    token_id: int
    output_index: int
    finish_reason: FinishReason | None  # set when this token ended the request


class Scheduler:
    def __init__(
        self,
        cfg: EngineConfig,
        *,
        num_blocks: int,
        max_model_len: int,
        vocab_size: int,
        eos_token_ids: Iterable[int] = (),
        max_waiting: int = 4096,
        spec: SpecPlanner | None = None,
    ) -> None:
        if cfg.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {cfg.max_num_seqs}")
        # Every running request must be able to decode in every step, or a
        # request with an output in flight could be skipped and its
        # placeholder would no longer come from the previous step.
        if cfg.max_num_batched_tokens < cfg.max_num_seqs:
            raise ValueError(
                f"max_num_batched_tokens ({cfg.max_num_batched_tokens}) must be >= max_num_seqs ({cfg.max_num_seqs})"
            )
        if not cfg.enable_chunked_prefill and cfg.max_num_batched_tokens < max_model_len:
            raise ValueError(
                f"without chunked prefill max_num_batched_tokens ({cfg.max_num_batched_tokens}) "
                f"must be >= max_model_len ({max_model_len}), or a long prompt could never run"
            )
        self.cfg = cfg
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_waiting = max_waiting
        # The KV depends on the model, its weights and dtype, and the runtime
        # computing it; the keys say so (prefix_cache.py).
        salt = cache_salt(cfg.model, cfg.load_format, cfg.seed, cfg.dtype, cfg.runtime, cfg.device, cfg.block_size)
        self.block_manager = BlockManager(num_blocks, cfg.block_size, salt if cfg.prefix_cache else None)
        self._caching = cfg.prefix_cache
        self._seed_rng = random.Random(cfg.seed)
        self.waiting: deque[Request] = deque()  # sorted by arrival
        self.running: list[Request] = []  # sorted by arrival
        # Live requests, plus finished ones whose outputs are still in flight
        # (their rows must be recognised and discarded in update()).
        self._requests: dict[int, Request] = {}
        # Left the running set since the last non-empty schedule. A request
        # preempted during an empty schedule() can be admitted again before
        # this is handed out: it is then both freed and in the rows, and the
        # runner, which applies freed_req_ids first, gives it a fresh row.
        self._freed: list[int] = []
        self._next_arrival = 0
        self._step_id = 0
        self._last_updated_step = 0
        self.num_preemptions = 0
        self.prefix_queried_tokens = 0
        self.prefix_hit_tokens = 0
        self.prompt_tokens_computed = 0
        self._to_key: list[Request] = []  # rows of this schedule() that completed a block
        self.spec = spec  # speculative decoding (stages/spec/planner.py); None: off

    # ---- admission and removal ------------------------------------------

    def add_request(self, req_id: int, prompt_ids: Sequence[int], params: SamplingParams) -> Request:
        if not 0 <= req_id <= U64_MAX:
            raise InvalidRequest("request_id", f"must be a u64, got {req_id}")
        if req_id in self._requests:
            raise InvalidRequest("request_id", f"request {req_id} is already live")
        validate_request(prompt_ids, params, self.vocab_size, self.max_model_len)
        bm = self.block_manager
        validate_fits_cache(len(prompt_ids), params.max_tokens, bm.num_blocks * bm.block_size)
        if len(self.waiting) >= self.max_waiting:
            raise SchedulerFull(f"{len(self.waiting)} requests are already waiting (the bound)")
        # Drawn only for admitted requests, in admission order: the same
        # stream of requests gets the same seeds whatever the mode.
        seed = params.seed if params.seed is not None else self._seed_rng.getrandbits(64)
        req = Request(req_id, prompt_ids, params, seed, self._next_arrival)
        req.stops = token_stops(params, self.eos_token_ids, req.num_prompt_tokens, self.max_model_len)
        self._next_arrival += 1
        self.waiting.append(req)
        self._requests[req_id] = req
        return req

    def abort(self, req_id: int) -> bool:
        """Finish a request now and free its blocks; False if it is unknown or already finished."""
        req = self._requests.get(req_id)
        if req is None or req.is_finished:
            return False
        self._finish(req, FinishReason.ABORTED)
        return True

    def finish_request(self, req_id: int, reason: FinishReason) -> bool:
        """Finish a request for a reason found after update() (a stop string)."""
        req = self._requests.get(req_id)
        if req is None or req.is_finished:
            return False
        self._finish(req, reason)
        return True

    def get_request(self, req_id: int) -> Request | None:
        return self._requests.get(req_id)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_used_blocks(self) -> int:
        return self.block_manager.num_used_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.block_manager.num_free_blocks

    @property
    def last_step_id(self) -> int:
        """The id of the last step handed out (0 before the first)."""
        return self._step_id

    @property
    def stats(self) -> SchedulerStats:
        bm = self.block_manager
        return SchedulerStats(
            num_waiting=len(self.waiting),
            num_running=len(self.running),
            num_blocks_used=bm.num_used_blocks,
            num_blocks_free=bm.num_free_blocks,
            num_preemptions=self.num_preemptions,
            num_steps=self._step_id,
            num_blocks_evictable=bm.num_evictable_blocks,
            num_blocks_cached=bm.num_cached_blocks,
            prefix_queried_tokens=self.prefix_queried_tokens,
            prefix_hit_tokens=self.prefix_hit_tokens,
            prompt_tokens_computed=self.prompt_tokens_computed,
        )

    # ---- scheduling ------------------------------------------------------

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
            self.spec.begin_step()

        # Pass 1: decodes. A victim is never a row already in this step: it
        # is a request whose last output is in flight, or one later in
        # arrival order, which this pass has not reached yet.
        for req in list(self.running):
            if req.status is not RequestStatus.RUNNING:
                continue  # preempted for an earlier decode
            if req.num_tokens_to_compute != 1 or req.num_outputs >= req.params.max_tokens:
                continue  # a prefill (pass 2), or its last output is already in flight
            drafts: list[int] = []
            if self.spec is not None:
                if self.spec.waits(req):
                    continue  # its verify step's accept count is not on the host yet
                drafts = self.spec.drafts(req, spare)
            n, did_preempt = self._make_room(req, 1 + len(drafts), scheduled, allow_self=True)
            preempted |= did_preempt
            if req.status is not RequestStatus.RUNNING:
                continue  # it preempted itself: it was the latest
            drafts = drafts[: n - 1]  # as many as found KV room
            spare -= len(drafts)
            rows.append(self._row(req, n, step_id, drafts))
            if self.spec is not None:
                self.spec.planned(req, rows[-1])  # the draft method's chunk (spec/draft_plan.py)
            scheduled.add(req.req_id)
            budget -= n

        # Pass 2: prompts already started continue (chunked prefill).
        for req in list(self.running):
            if budget <= 0:
                break
            if req.req_id in scheduled or req.status is not RequestStatus.RUNNING:
                continue
            if req.num_tokens_to_compute <= 1:
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

    def _row(self, req: Request, n: int, step_id: int, drafts: Sequence[int] = ()) -> ScheduledRow:
        start = req.num_computed_tokens
        known = n - len(drafts)  # drafts follow the request's known tokens (a verify row)
        token_ids = req.token_ids_slice(start, start + known)
        sample = start + known == req.num_tokens
        from_prev = token_ids[-1] == -1
        token_ids.extend(drafts)
        if from_prev:
            # Only the newest token can be in flight, and only from the step
            # just before: that is where the runner reads it from.
            if n != 1 or req.last_sample_step != step_id - 1:
                raise RuntimeError(f"{req}: in-flight input token not from the previous step")
        # For a prefill chunk that does not sample, the index its request's
        # next sample will have: the runner seeds a new row's sampling stream
        # from (seed, output_index), also when it resumes after preemption.
        output_index = req.num_outputs
        req.num_computed_tokens += n
        if start < req.num_prompt_tokens:
            self.prompt_tokens_computed += min(start + n, req.num_prompt_tokens) - start
        if self._caching and req.num_computed_tokens >= (req.num_keyed_blocks + 1) * self.cfg.block_size:
            self._to_key.append(req)  # keyed when this step is complete, never shared within it
        if sample:
            req.num_placeholders += 1
            req.last_sample_step = step_id
        return ScheduledRow(
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

    # ---- outputs ---------------------------------------------------------

    def update(self, so: SchedulerOutput, out: StepOutput) -> list[SampledToken]:
        """Apply one step's sampled tokens, in step order; returns the accepted ones."""
        if so.step_id != self._last_updated_step + 1:
            raise RuntimeError(f"update for step {so.step_id} but step {self._last_updated_step + 1} is next")
        if out.step_id != so.step_id or len(out.sampled) != len(so.rows):
            raise ValueError(f"step output {out.step_id} ({len(out.sampled)} rows) does not match step {so.step_id}")
        self._last_updated_step = so.step_id
        accepted: list[SampledToken] = []
        sampled = out.sampled.tolist()  # Python ints: indexing numpy per row costs more than the row
        finish = out.finish.tolist() if out.finish is not None else None
        accept_num = out.accept_num.tolist() if out.accept_num is not None else None
        for i, row in enumerate(so.rows):
            if not row.sample:
                continue
            req = self._requests.get(row.req_id)
            if req is None:
                raise RuntimeError(f"step {so.step_id} row {i}: request {row.req_id} is unknown")
            req.num_placeholders -= 1
            if req.is_finished:
                # Finished (or aborted) after this step was scheduled: its
                # output is never emitted.
                if req.num_placeholders == 0:
                    del self._requests[req.req_id]
                continue
            if row.output_index != len(req.output_token_ids):
                raise RuntimeError(f"{req}: output {row.output_index} arrived out of order")
            # A preempted request still takes this output (FastDeploy #6176)
            # and recomputes it with the rest when it runs again.
            if row.num_drafts:
                assert accept_num is not None and out.spec_tokens is not None and self.spec is not None
                accepted.extend(self._apply_verified(req, i, row, out.spec_tokens[i, : accept_num[i]].tolist()))
                continue
            token = sampled[i]
            req.output_token_ids.append(token)
            if finish is not None and row.stops is not None:
                # the device checked the row's stops: only ids past its table are left
                reason = device_stop_reason(finish[i], token, row.stops)
            else:
                reason = token_stop_reason(req, token, self.eos_token_ids, self.max_model_len)
            if reason is not None:
                self._finish(req, reason)
            accepted.append(SampledToken(req, req.req_id, i, token, row.output_index, reason))
        return accepted

    def skip_step(self, so: SchedulerOutput) -> None:
        """A step whose outputs will never come (it failed on the device): its
        rows' requests must be finished already; settle their placeholders so
        the next step's update() is in order. A step already applied is left alone."""
        if so.step_id <= self._last_updated_step:
            return
        if so.step_id != self._last_updated_step + 1:
            raise RuntimeError(f"skip of step {so.step_id} but step {self._last_updated_step + 1} is next")
        self._last_updated_step = so.step_id
        for row in so.rows:
            req = self._requests.get(row.req_id)
            if not row.sample or req is None:
                continue
            if not req.is_finished:
                raise RuntimeError(f"{req}: its step failed but it is still live; finish it first")
            req.num_placeholders -= 1
            if req.num_placeholders == 0:
                del self._requests[req.req_id]

    def _apply_verified(self, req: Request, i: int, row: ScheduledRow, tokens: list[int]) -> list[SampledToken]:
        """A verify row's tokens, in order, up to the first that ends the request
        (eos, a stop id, the length limit: nothing past it is emitted)."""
        out: list[SampledToken] = []
        for j, token in enumerate(tokens):
            req.output_token_ids.append(token)
            # the device's finish code is for one token a row: the host checks these
            reason = token_stop_reason(req, token, self.eos_token_ids, self.max_model_len)
            out.append(SampledToken(req, req.req_id, i, token, row.output_index + j, reason))
            if reason is not None:
                break
        assert self.spec is not None
        self.spec.verified(req, row, len(tokens), len(out), self.block_manager)
        if out[-1].finish_reason is not None:
            self._finish(req, out[-1].finish_reason)
        return out

    # ---- state changes ---------------------------------------------------

    def _leave_running(self, req: Request) -> None:
        self.running.remove(req)
        self._freed.append(req.req_id)

    def _release_blocks(self, req: Request) -> None:
        if self._caching:
            cache_full_blocks(self.block_manager, req)  # its tail may have become known since it was scheduled
        self.block_manager.free(req.block_ids)
        req.block_ids = []  # a new list: rows handed out keep their snapshots
        req.num_computed_tokens = 0
        req.num_keyed_blocks = 0
        req.num_draft_computed = 0  # the draft model's KV lived in those blocks (spec/draft_plan.py)

    def _preempt(self, req: Request) -> None:
        self._leave_running(req)
        self._release_blocks(req)
        # Placeholders stay: the step in flight still delivers those outputs.
        req.status = RequestStatus.PREEMPTED
        req.num_preemptions += 1
        self.num_preemptions += 1
        self._insert_by_arrival(self.waiting, req)

    def _finish(self, req: Request, reason: FinishReason) -> None:
        if req.status is RequestStatus.RUNNING:
            self._leave_running(req)
        else:
            self.waiting.remove(req)
        self._release_blocks(req)
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason
        if req.num_placeholders == 0:
            del self._requests[req.req_id]

    @staticmethod
    def _insert_by_arrival(queue: deque[Request] | list[Request], req: Request) -> None:
        # Both queues stay sorted by arrival, so "latest arrived" is the end
        # and a preempted request goes back in front of newer ones.
        bisect.insort(queue, req, key=lambda r: r.arrival)
