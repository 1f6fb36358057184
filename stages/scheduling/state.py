"""The scheduler's request bookkeeping: which requests are live, where each one
stands, and the state changes that move it between the queues.

Both queues, `waiting` and `running`, stay sorted by arrival: the passes walk
them in that order, and the latest-arrived request is a queue's end. A
preempted request loses its blocks and its computed positions and goes back
into the waiting queue by arrival; its placeholders stay, since the step in
flight still delivers those outputs. A finished request leaves the queues at
once but stays known while any of its outputs is in flight, so that update()
recognises and discards those rows (updates.py).

Which request runs, is admitted or is preempted is the policy's (scheduler.py).
"""

from __future__ import annotations

import bisect
import random
from collections import deque
from typing import Iterable, Sequence

from ..engine.config import EngineConfig
from ..kv.block_manager import BlockManager
from ..kv.prefix_cache import cache_salt
from ..kv.sequence_blocks import cache_full_blocks
from ..request import (
    U64_MAX,
    InvalidRequest,
    Request,
    RequestStatus,
    token_stops,
    validate_fits_cache,
    validate_request,
)
from ..spec.planner import SpecPlanner
from ..step_types import FinishReason, SamplingParams
from .stats import SchedulerStats


class SchedulerFull(RuntimeError):
    """The waiting queue is at its bound; the caller should answer `overloaded`."""


class SchedulerState:
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
        if self.spec is not None:
            self.spec.forget(req.req_id)
        if req.num_placeholders == 0:
            del self._requests[req.req_id]

    @staticmethod
    def _insert_by_arrival(queue: deque[Request] | list[Request], req: Request) -> None:
        # Both queues stay sorted by arrival, so "latest arrived" is the end
        # and a preempted request goes back in front of newer ones.
        bisect.insort(queue, req, key=lambda r: r.arrival)
