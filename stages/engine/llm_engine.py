"""LLMEngine: the whole engine in one synchronous loop, for in-process use and tests.

    step():  schedule -> runner.execute -> output processor     (sync)
    step():  schedule N+1, launch N+1, collect N, process N     (overlap=True)

The overlap loop is the reference for the asyncio pipeline: one step is in
flight while the next is scheduled and launched, decode rows take their
input token from the previous launch's device output, and the scheduler's
placeholders keep its bookkeeping right until the outputs land.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Sequence

from ..model.loader import load_model
from ..output.processor import OutputProcessor, RequestOutput, StepResult, TokenLogprob
from ..parallel.supervisor import TensorParallel
from ..runner.model_runner import ModelRunner, StepHandle
from ..runtime import load_runtime
from ..scheduling import Scheduler
from ..spec import SpecPlanner
from ..spec.config import spec_config_of
from ..spec.draft_model import load_draft_checkpoint
from ..step_types import FinishReason, SamplingParams, SchedulerOutput
from .config import EngineConfig
from .sizing import kv_cache_num_blocks

# Consecutive schedule() calls that produce nothing while work is left and
# nothing is in flight before the loop calls it a scheduler bug, not a wait.
MAX_IDLE_SCHEDULES = 8


@dataclass(slots=True)
class GenerateResult:
    req_id: int
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: FinishReason | None = None
    logprobs: list[TokenLogprob] | None = None


class LLMEngine:
    def __init__(self, cfg: EngineConfig, *, overlap: bool = False, max_waiting: int = 4096,
                 max_inflight: int = 2) -> None:
        self.cfg = cfg
        self.overlap = overlap
        self.ops = load_runtime(cfg.runtime, cfg.device)
        # tensor parallelism: this process is rank 0 of a group whose workers start now
        self.parallel = TensorParallel(cfg, self.ops) if cfg.tensor_parallel_size > 1 else None
        try:
            self.loaded = load_model(cfg, self.ops, self.parallel.shard if self.parallel is not None else None)
            self.tokenizer = self.loaded.tokenizer
            self.vocab_size = self.loaded.config.vocab_size
            self.max_model_len = self.loaded.max_model_len
            self.max_num_seqs = cfg.max_num_seqs
            # a separate draft model: loaded first, so that its KV cache counts in kv_cache_bytes
            draft = load_draft_checkpoint(cfg, self.loaded, self.ops) \
                if cfg.speculative == "draft" and cfg.speculative_draft_model else None
            self.num_blocks = kv_cache_num_blocks(cfg, self.loaded.config, draft.config if draft else None)
            # a staging buffer for each step in flight, and one being prepared
            self.runner = ModelRunner(self.loaded, self.ops, cfg, self.num_blocks, staging_depth=max_inflight + 1,
                                      draft_checkpoint=draft)
            if self.parallel is not None:
                self.parallel.attach(self.runner)
        except BaseException:
            self.close()
            raise
        spec = spec_config_of(cfg)
        self.spec = SpecPlanner(spec, cfg.max_num_batched_tokens) if spec.enabled else None  # speculative decoding; None: off
        self.scheduler = Scheduler(
            cfg,
            num_blocks=self.num_blocks,
            max_model_len=self.max_model_len,
            vocab_size=self.vocab_size,
            eos_token_ids=self.loaded.eos_token_ids,
            max_waiting=max_waiting,
            spec=self.spec,
        )
        self.output_processor = OutputProcessor(self.scheduler, self.tokenizer)
        self._in_flight: tuple[SchedulerOutput, StepHandle] | None = None
        self._next_id = itertools.count(1)
        self._idle_schedules = 0
        self.last_result: StepResult | None = None  # the latest step's outputs and ring rows

    def close(self) -> None:
        """Stops the tensor-parallel workers, if any (nothing else needs closing).
        Call it once no step is being launched."""
        if self.parallel is not None:
            self.parallel.close()

    # ---- requests ----------------------------------------------------------

    def add_request(
        self, prompt: str | Sequence[int], params: SamplingParams | None = None, req_id: int | None = None
    ) -> int:
        """Admit a request; raises InvalidRequest naming the bad field."""
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if req_id is None:
            req_id = next(self._next_id)
            while self.scheduler.get_request(req_id) is not None:
                req_id = next(self._next_id)
        req = self.scheduler.add_request(req_id, ids, params or SamplingParams())
        self.output_processor.add_request(req)
        return req_id

    def abort(self, req_id: int) -> RequestOutput | None:
        """Finish a request now (its KV blocks are free on return); None if it is not live."""
        return self.output_processor.abort(req_id)

    def has_work(self) -> bool:
        return self.scheduler.has_work() or self._in_flight is not None

    @property
    def in_flight(self) -> SchedulerOutput | None:
        """The step launched but not yet collected (overlap mode)."""
        return self._in_flight[0] if self._in_flight is not None else None

    # ---- the loop ----------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        result = self._step_overlap() if self.overlap else self._step_sync()
        self.last_result = result
        return result.outputs if result is not None else []

    def _schedule(self) -> SchedulerOutput:
        so = self.scheduler.schedule()
        if not so.is_empty or self._in_flight is not None or not self.scheduler.has_work():
            self._idle_schedules = 0
        else:
            self._idle_schedules += 1
            if self._idle_schedules > MAX_IDLE_SCHEDULES:
                raise RuntimeError(f"the scheduler made no progress: {self.scheduler.stats}")
        return so

    def _step_sync(self) -> StepResult | None:
        so = self._schedule()
        if so.is_empty:
            return None
        return self.output_processor.process(so, self.runner.execute(so))

    def _step_overlap(self) -> StepResult | None:
        so = self._schedule()
        launched = None
        if not so.is_empty:
            launched = (so, self.runner.launch(self.runner.prepare(so)))
        result = None
        if self._in_flight is not None:
            prev_so, handle = self._in_flight
            result = self.output_processor.process(prev_so, self.runner.collect(handle))
        self._in_flight = launched
        return result

    def generate(
        self, prompts: Sequence[str | Sequence[int]], params: SamplingParams | Sequence[SamplingParams] | None = None
    ) -> list[GenerateResult]:
        """Run prompts to completion; results in the order of `prompts`."""
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params")
        results: dict[int, GenerateResult] = {}
        order = []
        for prompt, sp in zip(prompts, params, strict=True):
            rid = self.add_request(prompt, sp)
            req = self.scheduler.get_request(rid)
            assert req is not None
            results[rid] = GenerateResult(rid, list(req.prompt_token_ids), logprobs=[] if sp.logprobs else None)
            order.append(rid)
        while self.has_work():
            for out in self.step():
                res = results.get(out.req_id)
                if res is None:
                    continue  # a request added by someone else
                res.token_ids.extend(out.new_token_ids)
                res.text += out.text_delta
                if out.logprobs is not None and res.logprobs is not None:
                    res.logprobs.extend(out.logprobs)
                res.finish_reason = out.finish_reason
        return [results[rid] for rid in order]
