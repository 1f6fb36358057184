"""The execute side of a step: SchedulerOutput in, StepOutput out.

Three calls so the pipeline can overlap them:
- `prepare` (host only, any thread): fills a staging buffer from a bounded pool;
- `launch` (the execute thread): copies the staged inputs into the persistent
  device buffers, takes decode inputs from the previous launch's device output,
  runs forward and sampling, starts the copy of the outputs to the host, and
  returns without waiting for the device where the runtime allows;
- `collect` (any thread): waits for those outputs, returns the staging buffer.
`execute` chains the three for the synchronous path.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from .engine_config import EngineConfig
from .input_batch import BatchLimits, DeviceInputs, StagedCounts, StagingBuffer, StagingPool
from .model.loader import LoadedModel
from .model.paged_metadata import build_attention_metadata
from .runtime.ops import HostFuture, Ops
from .sampler import Sampler
from .step_stager import StepStager
from .step_types import SchedulerOutput, StepOutput

DEFAULT_STAGING_DEPTH = 3  # one being prepared, one launched, one being collected


@dataclass(slots=True)
class PreparedStep:
    seq: int  # launch order: the n-th prepared step must be the n-th launched
    step_id: int
    req_ids: np.ndarray  # uint64 [R]
    counts: StagedCounts
    any_random: bool
    num_logprobs: int
    buf: StagingBuffer | None  # None for an empty step


@dataclass(slots=True)
class StepHandle:
    prepared: PreparedStep
    ints: HostFuture | None  # int64 [R, 2 + k]: sampled, rank, top-k ids
    logprobs: HostFuture | None  # float32 [R, k + 1]


class ModelRunner:
    def __init__(self, loaded: LoadedModel, ops: Ops, cfg: EngineConfig, num_blocks: int,
                 staging_depth: int = DEFAULT_STAGING_DEPTH) -> None:
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens"):
            if getattr(cfg, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(cfg, name)}")
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.ops = ops
        self.model = loaded.model
        self.num_blocks = num_blocks
        self.block_size = cfg.block_size
        self.max_model_len = loaded.max_model_len
        self.limits = BatchLimits(
            max_tokens=cfg.max_num_batched_tokens,
            max_rows=cfg.max_num_seqs,
            max_blocks=-(-self.max_model_len // cfg.block_size),
            block_size=cfg.block_size,
            num_blocks=num_blocks,
            max_model_len=self.max_model_len,
            vocab_size=loaded.config.vocab_size,
        )
        self.kv_caches = self.model.allocate_kv_caches(num_blocks, cfg.block_size)
        self.inputs = DeviceInputs(ops, self.limits)
        self.sampler = Sampler(ops, loaded.config.vocab_size)
        self._stager = StepStager(self.limits)
        self._pool = StagingPool(self.limits, staging_depth)
        self._lock = threading.Lock()  # prepare may run beside launch/collect
        self._prepared = 0
        self._launched = 0

    # --- the three phases -----------------------------------------------------
    def prepare(self, so: SchedulerOutput) -> PreparedStep:
        req_ids = np.fromiter((r.req_id for r in so.rows), dtype=np.uint64, count=len(so.rows))
        any_random = any(r.sample and r.params.temperature > 0 for r in so.rows)
        num_logprobs = max((r.params.logprobs for r in so.rows), default=0)
        with self._lock:
            buf = self._pool.acquire() if so.rows else None
            try:
                counts = self._stager.stage(so, buf) if buf is not None else self._stager.stage_empty(so)
            except BaseException:
                if buf is not None:
                    self._pool.release(buf)
                raise
            self._prepared += 1
            return PreparedStep(self._prepared, so.step_id, req_ids, counts, any_random, num_logprobs, buf)

    def launch(self, prepared: PreparedStep) -> StepHandle:
        if prepared.seq != self._launched + 1:
            raise RuntimeError(f"steps must be launched in the order they were prepared: expected "
                               f"#{self._launched + 1}, got #{prepared.seq}")
        self._launched = prepared.seq
        if prepared.buf is None:
            return StepHandle(prepared, None, None)
        try:
            return self._run(prepared)
        except BaseException:
            self._pool.release(prepared.buf)  # a failed step must not leak its staging buffer
            prepared.buf = None
            raise

    def _run(self, prepared: PreparedStep) -> StepHandle:
        ops, inp, n = self.ops, self.inputs, prepared.counts
        assert prepared.buf is not None
        inp.load(prepared.buf, n)
        r = n.num_rows
        meta = build_attention_metadata(
            ops,
            num_tokens=n.num_tokens,
            block_size=self.block_size,
            query_start_loc=inp.query_start_loc[: r + 1],
            start_pos=inp.start_pos[:r],
            seq_lens=inp.seq_lens[:r],
            row_slots=inp.row_slots[:r],
            block_tables=inp.block_tables,
            query_lens_host=n.query_lens,
            seq_lens_host=n.seq_lens,
        )
        hidden = self.model.forward(inp.input_ids[: n.num_tokens], meta, self.kv_caches)
        logits = self.model.compute_logits(hidden, ops.sub(inp.query_start_loc[1: r + 1], 1))
        params = inp.sampling.build(inp.row_slots[:r])
        out = self.sampler(logits, params, any_random=prepared.any_random, num_logprobs=prepared.num_logprobs)
        if prepared.any_random:
            inp.sampling.advance_seeds_(inp.row_slots[:r], params.seed_state, inp.sample_mask[:r])
        ops.copy_(inp.prev_sampled, out.sampled)  # the next launch's decode inputs
        return StepHandle(
            prepared,
            ops.to_host_async(out.ints),
            ops.to_host_async(out.logprobs) if out.logprobs is not None else None,
        )

    def collect(self, handle: StepHandle) -> StepOutput:
        p = handle.prepared
        k = p.num_logprobs
        try:
            if handle.ints is None:
                return _empty_output(p.step_id)
            ints = handle.ints.result()
            lps = handle.logprobs.result() if handle.logprobs is not None else None
        finally:
            if p.buf is not None:
                self._pool.release(p.buf)
                p.buf = None
        return StepOutput(
            step_id=p.step_id,
            req_ids=p.req_ids,
            sampled=ints[:, 0].astype(np.int32),
            k=k,
            logprobs=lps.astype(np.float32) if lps is not None else None,
            top_ids=ints[:, 2:].astype(np.int32) if k else None,
            ranks=ints[:, 1].astype(np.int32) if k else None,
        )

    def execute(self, so: SchedulerOutput) -> StepOutput:
        return self.collect(self.launch(self.prepare(so)))

    # --- introspection ------------------------------------------------------------
    @property
    def staging_available(self) -> int:
        """Staging buffers free now: how many more steps may be prepared before a collect."""
        return self._pool.available

    def slot_of(self, req_id: int) -> int | None:
        return self._stager.slots.get(req_id)

    def persistent_buffers(self) -> dict[str, Any]:
        return self.inputs.persistent_tensors()


def _empty_output(step_id: int) -> StepOutput:
    return StepOutput(step_id=step_id, req_ids=np.zeros(0, np.uint64), sampled=np.zeros(0, np.int32),
                      k=0, logprobs=None, top_ids=None, ranks=None)
