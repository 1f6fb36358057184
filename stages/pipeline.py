"""The pipeline: four asyncio stages joined by bounded queues.

    submit -> [preprocess] -q_prepared-> [execute] -q_launched-> [postprocess] -q_processed-> [emit]
                  ^                                                    |
                  +---------------- finished / freed ------------------+

`Pipeline` is also what the socket server calls (the daemon's Engine
protocol): `submit`, `abort`, `stats`, `draining`. Everything runs on one
event loop except the device work, which runs on the execute stage's thread.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import os
import time
from dataclasses import dataclass
from typing import Any

import structlog
from overlapd.daemon.engine_api import (
    EngineError,
    GenerateParams,
    RequestSink,
    TokenLogprob,
)
from overlapd.daemon.socket_setup import resolve_gid
from overlapd.kernels.handoff import CompletionQueue
from overlapd.kernels.ring import RingWriter
from overlapd.stages.emit import emit_loop
from overlapd.stages.engine import LLMEngine
from overlapd.stages.engine_config import EngineConfig
from overlapd.stages.execute import Executor
from overlapd.stages.pipeline_config import PipelineConfig, RingConfig
from overlapd.stages.postprocess import postprocess_loop
from overlapd.stages.preprocess import preprocess_loop
from overlapd.stages.request import InvalidRequest, validate_request
from overlapd.stages.stage_times import StageTimes
from overlapd.stages.step_types import FinishReason, SamplingParams

log = structlog.get_logger("overlapd.pipeline")


@dataclass(slots=True)
class LiveRequest:
    sink: RequestSink
    prompt_ids: list[int]
    params: SamplingParams
    completion_tokens: int = 0


class Pipeline:
    def __init__(self, engine_cfg: EngineConfig, cfg: PipelineConfig, ring_cfg: RingConfig) -> None:
        self.cfg = cfg
        self.ring_cfg = ring_cfg
        self.engine = LLMEngine(engine_cfg, max_inflight=cfg.max_inflight)
        self.model_name = engine_cfg.model
        # Longer texts tokenize to more than max_model_len tokens (tokenizer.py).
        self.max_prompt_chars = self.engine.max_model_len * self.engine.tokenizer.max_chars_per_token
        self.times = StageTimes()
        self._ids = itertools.count(1)
        self._live: dict[int, LiveRequest] = {}
        self._admission: collections.deque[int] = collections.deque()
        self._draining = False
        self._tasks: list[asyncio.Task[None]] = []
        self._started = time.monotonic()
        self.ring: RingWriter | None = None
        self.ring_records = 0
        self.counters = collections.Counter[str]()
        self.failed: BaseException | None = None  # the error that killed a stage, if one died

    # ------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        depth = self.cfg.queue_depth
        self.q_prepared: asyncio.Queue[Any] = asyncio.Queue(depth)
        self.q_launched: asyncio.Queue[Any] = asyncio.Queue(depth)
        self.q_processed: asyncio.Queue[Any] = asyncio.Queue(depth)
        self.inflight = asyncio.Semaphore(self.cfg.max_inflight)
        self.work_available = asyncio.Event()
        self.idle = asyncio.Event()
        self.idle.set()
        self.failure = asyncio.Event()  # set when a stage task dies: the daemon must exit
        self.completions = CompletionQueue(loop)
        self.executor = Executor(self)
        if self.ring_cfg.enabled:
            self.ring = RingWriter(
                self.ring_cfg.path,
                capacity=self.ring_cfg.capacity,
                max_slots=self.engine.max_num_seqs,
                vocab_size=self.engine.vocab_size,
                model_name=_last_utf8_bytes(self.model_name, 255),
                mode=self.ring_cfg.mode,
                backpressure=self.ring_cfg.backpressure,
            )
            if self.ring_cfg.group is not None:
                # Readers in this group may map the ring (mode 0640 by default).
                os.chown(self.ring_cfg.path, -1, resolve_gid(self.ring_cfg.group))
        for name, coro in (
            ("preprocess", preprocess_loop(self)),
            ("execute", self.executor.run()),
            ("postprocess", postprocess_loop(self)),
            ("emit", emit_loop(self)),
            ("heartbeat", self._heartbeat()),
        ):
            task = loop.create_task(coro, name=f"overlapd-{name}")
            task.add_done_callback(self._stage_died)
            self._tasks.append(task)

    def _stage_died(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("stage_failed", stage=task.get_name(), error=repr(task.exception()))
            self.failed = task.exception()
            self.failure.set()

    async def _heartbeat(self) -> None:
        while True:
            if self.ring is not None:
                self.ring.heartbeat()
                self.ring.evict_dead_readers()
            await asyncio.sleep(self.cfg.heartbeat_interval_s)

    @property
    def draining(self) -> bool:
        return self._draining

    async def drain(self, timeout: float) -> None:
        """Stop admitting, let live requests finish (abort what is left after
        `timeout` seconds), then close the ring with a negated last step id."""
        self._draining = True
        if not self.idle.is_set():
            try:
                await asyncio.wait_for(self.idle.wait(), timeout)
            except asyncio.TimeoutError:
                log.warning("drain_timeout", aborting=len(self._live))
        for req_id in list(self._live):
            self.abort(req_id)
        await self.close()

    async def close(self) -> None:
        # Schedule nothing more, then let steps already scheduled finish and be
        # emitted: the device must be idle and every record out before the ring
        # says "closed". Preprocess hands its permit back when cancelled, so
        # holding every permit means no step is in flight.
        preprocess, *others = self._tasks
        preprocess.cancel()
        await asyncio.gather(preprocess, return_exceptions=True)
        # A stage that died keeps the permits and queue items it held: its
        # steps will never finish, so waiting for them would hang the exit.
        settled = asyncio.ensure_future(self._in_flight_settled())
        failed = asyncio.ensure_future(self.failure.wait())
        await asyncio.wait({settled, failed}, return_when=asyncio.FIRST_COMPLETED)
        settled.cancel()
        failed.cancel()
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)
        self.executor.shutdown()
        self.completions.close()
        if self.ring is not None:
            last = -(self.engine.scheduler.last_step_id + 1)
            for _ in range(1000):  # a backpressure reader gets a moment to make room
                if self.ring.publish_step(step_id=last, request_id=[], finish=[], tokens=[]) is not None:
                    break
                self.ring.evict_dead_readers()
                await asyncio.sleep(0.001)
            self.ring.close(clean=True)

    async def _in_flight_settled(self) -> None:
        for _ in range(self.cfg.max_inflight):
            await self.inflight.acquire()
        await self.q_processed.join()

    # ------------------------------------------------------------ Engine protocol
    def submit(self, params: GenerateParams, sink: RequestSink) -> int:
        if self._draining:
            raise EngineError("shutting_down", "the daemon is shutting down and takes no new requests")
        if len(self._admission) + self.engine.scheduler.num_waiting >= self.cfg.max_waiting:
            self.counters["overloaded"] += 1
            raise EngineError("overloaded", f"{self.cfg.max_waiting} requests are already waiting; retry later")
        if params.prompt is not None and len(params.prompt) > self.max_prompt_chars:
            # Encoding runs on the event loop (~0.8 s for 1 MiB of text, every
            # client stalled meanwhile); a text this long cannot fit anyway.
            raise EngineError(
                "invalid_request",
                f"prompt: {len(params.prompt)} characters are more than a context of "
                f"{self.engine.max_model_len} tokens can hold; send a much shorter prompt",
            )
        prompt_ids = list(params.prompt_ids) if params.prompt_ids is not None else self.engine.tokenizer.encode(params.prompt)
        sp = SamplingParams(
            max_tokens=params.max_tokens,
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k,
            seed=params.seed,
            stop=tuple(params.stop),
            stop_token_ids=tuple(params.stop_token_ids),
            ignore_eos=params.ignore_eos,
            logprobs=params.logprobs,
            speculative=params.speculative,
        )
        try:
            validate_request(prompt_ids, sp, self.engine.vocab_size, self.engine.max_model_len)
        except InvalidRequest as exc:
            raise EngineError("invalid_request", str(exc)) from None
        req_id = next(self._ids)
        self._live[req_id] = LiveRequest(sink, prompt_ids, sp)
        self._admission.append(req_id)
        self.idle.clear()
        self.counters["requests"] += 1
        self.work_available.set()
        return req_id

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        """The prompt the model's chat template makes of `messages` (ChatTemplateError, a ValueError, if bad)."""
        return self.engine.loaded.chat_template.render(messages)

    def admit_waiting(self) -> None:
        """Hand admitted requests to the scheduler (preprocess stage, on the loop)."""
        while self._admission:
            req_id = self._admission.popleft()
            live = self._live.get(req_id)
            if live is None:
                continue
            try:
                self.engine.scheduler.add_request(req_id, live.prompt_ids, live.params)
            except Exception as exc:  # checked at submit already; never let one request stop the stage
                del self._live[req_id]
                live.sink.on_error("invalid_request", str(exc))
                self._maybe_idle()

    def abort(self, request_id: int) -> None:
        live = self._live.pop(request_id, None)
        if live is None:
            return
        if request_id in self._admission:
            self._admission.remove(request_id)
        else:
            self.engine.abort(request_id)  # frees its KV blocks now
        self.counters["aborted"] += 1
        live.sink.on_done(FinishReason.ABORTED.wire_name, len(live.prompt_ids), live.completion_tokens)
        self._maybe_idle()
        self.work_available.set()

    def deliver(self, outputs: list[Any]) -> None:
        """Per-request frames for one step (emit stage)."""
        for out in outputs:
            live = self._live.get(out.req_id)
            if live is None:
                continue  # aborted or disconnected meanwhile
            if out.new_token_ids:
                live.completion_tokens += len(out.new_token_ids)
                self.counters["tokens"] += len(out.new_token_ids)
                logprobs = None
                if out.logprobs:
                    logprobs = [TokenLogprob(lp.token_id, lp.logprob, lp.rank, list(lp.top)) for lp in out.logprobs]
                live.sink.on_tokens(list(out.new_token_ids), out.text_delta, logprobs)
            if out.finish_reason is not None:
                del self._live[out.req_id]
                if out.finish_reason == FinishReason.ERROR:
                    live.sink.on_error("internal", "the request failed inside the engine; see the daemon log")
                else:
                    live.sink.on_done(out.finish_reason.wire_name, len(live.prompt_ids), live.completion_tokens)
        self._maybe_idle()

    def fail_step(self, so: Any, exc: BaseException) -> list[Any]:
        """A step raised: end every request in it with an `internal` error, keep serving."""
        for row in so.rows:
            live = self._live.pop(row.req_id, None)
            self.engine.abort(row.req_id)
            if live is not None:
                live.sink.on_error("internal", f"the engine failed on this request's step: {exc}")
        self.counters["failed_steps"] += 1
        self._maybe_idle()
        return []

    def _maybe_idle(self) -> None:
        if not self._live:
            self.idle.set()

    def token_texts(self, token_ids: list[int]) -> list[str]:
        decode = self.engine.tokenizer.decode
        return [decode([t], skip_special_tokens=False) for t in token_ids]

    def stats(self) -> dict[str, int | float]:
        sched = self.engine.scheduler
        out: dict[str, int | float] = {
            "requests": self.counters["requests"],
            "tokens": self.counters["tokens"],
            "aborted": self.counters["aborted"],
            "overloaded": self.counters["overloaded"],
            "steps": self.times.steps,
            "live_requests": len(self._live),
            "queue_admission": len(self._admission),
            "queue_waiting": sched.num_waiting,
            "queue_running": sched.num_running,
            "queue_prepared": self.q_prepared.qsize(),
            "queue_launched": self.q_launched.qsize(),
            "queue_processed": self.q_processed.qsize(),
            "kv_blocks_used": sched.num_used_blocks,
            "kv_blocks_free": sched.num_free_blocks,
            "preemptions": sched.stats.num_preemptions,
            "ring_records": self.ring_records,
            # the writer's own count: it also frees dead readers while publishing
            "ring_readers_evicted": self.ring.readers_evicted() if self.ring is not None else 0,
            "uptime_s": time.monotonic() - self._started,
        }
        graphs = self.engine.runner.graphs  # None where no CUDA graphs are captured (CPU, or turned off)
        out["graph_captures"] = graphs.captures if graphs is not None else 0
        out["graph_replays"] = graphs.replays if graphs is not None else 0
        if self.engine.spec is not None:
            out.update(self.engine.spec.stats.snapshot())
        out.update(self.times.snapshot())
        return out


def _last_utf8_bytes(text: str, limit: int) -> str:
    """The tail of `text` that fits `limit` UTF-8 bytes (the ring's model-name field)."""
    return text.encode()[-limit:].decode("utf-8", "ignore")
