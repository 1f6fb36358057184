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
from overlapd.stages.engine.config import EngineConfig
from overlapd.stages.engine.llm_engine import LLMEngine
from overlapd.stages.execute import Executor
from overlapd.stages.pipeline_config import PipelineConfig, RingConfig
from overlapd.stages.postprocess import postprocess_loop
from overlapd.stages.preprocess import preprocess_loop
from overlapd.stages.request import InvalidRequest, validate_request, validate_sampling
from overlapd.stages.stage_times import StageTimes
from overlapd.stages.step_types import FinishReason, SamplingParams
from overlapd.stages.tokenization.pool import TokenizePool

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
        # Text prompts are encoded off the loop; their requests wait here meanwhile.
        self.tokenize = TokenizePool(self.engine.tokenizer, max_pending=cfg.max_waiting)
        self._tokenizing: dict[int, asyncio.Task[None]] = {}
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
        if self.engine.parallel is not None:  # a tensor-parallel worker's death ends the daemon
            self.engine.parallel.watch(loop, self._parallel_failed)
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

    def _parallel_failed(self, exc: BaseException) -> None:
        """The tensor-parallel group broke: no step can run any more. Every live
        request ends with an error frame now, and the daemon stops (nonzero)."""
        for req_id in list(self._live):
            live = self._live.pop(req_id)
            live.sink.on_error("internal", f"the engine stopped: {exc}")
        self._admission.clear()
        self._maybe_idle()
        if self.failed is None:
            self.failed = exc
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
        for task in self._tokenizing.values():
            task.cancel()
        self.tokenize.shutdown()
        # After a failure the execute thread may be stuck (in a collective whose
        # peer died): it must not hold the shutdown up.
        self.executor.shutdown(wait=self.failed is None)
        self.engine.close()
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
        waiting = len(self._admission) + len(self._tokenizing) + self.engine.scheduler.num_waiting
        if waiting >= self.cfg.max_waiting or (params.prompt_ids is None and self.tokenize.full):
            self.counters["overloaded"] += 1
            raise EngineError("overloaded", f"{waiting} requests are already waiting; retry later")
        if params.prompt is not None and len(params.prompt) > self.max_prompt_chars:
            # A text this long cannot fit: refused without spending a worker
            # on encoding it (~1 s for 1 MiB).
            raise EngineError(
                "invalid_request",
                f"prompt: {len(params.prompt)} characters are more than a context of "
                f"{self.engine.max_model_len} tokens can hold; send a much shorter prompt",
            )
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
            if params.prompt_ids is not None:
                prompt_ids = list(params.prompt_ids)
                validate_request(prompt_ids, sp, self.engine.vocab_size, self.engine.max_model_len)
            else:  # what can be checked before encoding is refused now; the prompt's own checks follow it
                validate_sampling(sp, self.engine.vocab_size, self.engine.max_model_len)
        except InvalidRequest as exc:
            raise EngineError("invalid_request", str(exc)) from None
        req_id = next(self._ids)
        if params.prompt_ids is not None:
            self._live[req_id] = LiveRequest(sink, prompt_ids, sp)
            self._admission.append(req_id)
            self.work_available.set()
        else:
            self._live[req_id] = LiveRequest(sink, [], sp)
            encoded = self.tokenize.encode(params.prompt or "")  # pending from now: the bound holds in a burst
            self._tokenizing[req_id] = asyncio.get_running_loop().create_task(self._encode(req_id, encoded))
        self.idle.clear()
        self.counters["requests"] += 1
        return req_id

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        """The prompt the model's chat template makes of `messages` (ChatTemplateError, a ValueError, if bad)."""
        return self.engine.loaded.chat_template.render(messages)

    async def _encode(self, req_id: int, encoded: asyncio.Future[list[int]]) -> None:
        """Tokenize a text prompt on the pool, then queue its request for admission
        (or end it with the error the prompt earned). Runs on the loop."""
        try:
            ids = await encoded
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a tokenizer failure costs this request only
            log.exception("tokenize_failed", request_id=req_id)
            ids, error = None, ("internal", f"the prompt could not be tokenized: {exc}")
        finally:
            self._tokenizing.pop(req_id, None)
        live = self._live.get(req_id)
        if live is None:
            return  # aborted (or its client left) while it was being encoded
        if ids is not None:
            try:
                validate_request(ids, live.params, self.engine.vocab_size, self.engine.max_model_len)
                error = None
            except InvalidRequest as exc:
                error = ("invalid_request", str(exc))
        if error is not None:
            del self._live[req_id]
            live.sink.on_error(*error)
            self._maybe_idle()
            return
        live.prompt_ids = ids
        self._admission.append(req_id)
        self.work_available.set()

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
        # Its outputs never come: without this, every later step's update
        # would find itself out of order and fail too.
        self.engine.scheduler.skip_step(so)
        # The failed step may not have written the blocks it was to fill, and
        # some were cached already (keyed when scheduled): forget every prefix.
        self.engine.scheduler.block_manager.clear_cache()
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
        st = sched.stats
        out: dict[str, int | float] = {
            "requests": self.counters["requests"],
            "tokens": self.counters["tokens"],
            "aborted": self.counters["aborted"],
            "overloaded": self.counters["overloaded"],
            "steps": self.times.steps,
            "live_requests": len(self._live),
            "queue_admission": len(self._admission),
            "queue_tokenize": self.tokenize.pending,  # text prompts being encoded (bounded by the pool)
            "queue_waiting": st.num_waiting,
            "queue_running": st.num_running,
            "queue_prepared": self.q_prepared.qsize(),
            "queue_launched": self.q_launched.qsize(),
            "queue_processed": self.q_processed.qsize(),
            # used + free + evictable = all blocks; cached counts held and evictable ones
            "kv_blocks_total": sched.block_manager.num_blocks,
            "kv_blocks_used": st.num_blocks_used,
            "kv_blocks_free": st.num_blocks_free,
            "kv_blocks_evictable": st.num_blocks_evictable,
            "kv_blocks_cached": st.num_blocks_cached,
            "prefix_cache_queried_tokens": st.prefix_queried_tokens,
            "prefix_cache_hit_tokens": st.prefix_hit_tokens,
            "prefix_cache_hit_rate": st.prefix_hit_tokens / st.prefix_queried_tokens if st.prefix_queried_tokens else 0.0,
            "prompt_tokens_computed": st.prompt_tokens_computed,
            "preemptions": st.num_preemptions,
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
