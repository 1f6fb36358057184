"""The execute side of a step: SchedulerOutput in, StepOutput out.

Three calls so the pipeline can overlap them:
- `prepare` (host only, any thread): fills a staging buffer from a bounded pool;
- `launch` (the execute thread): copies the staged inputs into the persistent
  device buffers, takes decode inputs from the previous launch's device output,
  runs forward and sampling, starts the copy of the outputs to the host, and
  returns without waiting for the device where the runtime allows;
- `collect` (any thread): waits for those outputs, returns the staging buffer.
`execute` chains the three for the synchronous path.

Decode steps replay a CUDA graph where the runtime can capture one
(`decode_graphs.py`): the same body, captured once per shape bucket and
sampling variant (greedy, or sampled; with or without logprobs), so seeded
sampling and logprobs run at graph speed too.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import numpy as np

from ..engine.config import EngineConfig
from ..model.loader import LoadedModel
from ..model.paged_metadata import build_attention_metadata
from ..runtime.ops import INT64, HostFuture, Ops
from ..sampling.sampler import Sampler, SamplerOutput
from ..spec import drafter as spec_drafter
from ..spec import verify as spec_verify
from ..spec.config import spec_config_of
from ..spec.draft_model import build_draft_model
from ..step_types import MAX_LOGPROBS, SchedulerOutput, StepOutput
from .decode_graphs import CaptureFn, DecodeGraphs, GraphKey, logprob_width
from .input_batch import (
    BatchLimits,
    DeviceInputs,
    StagedCounts,
    StagingBuffer,
    StagingPool,
)
from .step_stager import StepStager

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
    draft: spec_drafter.DraftBatch | None = None  # the draft method's work in this step (spec/drafter.py)

    @property
    def verifies(self) -> bool:
        """The step carries verify rows (stages/spec/verify.py)."""
        return self.counts.spec_rows is not None


@dataclass(slots=True)
class StepHandle:
    prepared: PreparedStep
    # int64 [R, 2] or [R, 3 + k]: sampled, finish, then rank and top-k ids; a
    # verify step's rows (one per token) carry every column and its draft match last
    ints: HostFuture | None
    logprobs: HostFuture | None  # float32 [R, k + 1]


class StepLauncher(Protocol):
    """Rank 0's side of tensor parallelism (stages/parallel/supervisor.py): hands
    a step to the workers, then runs it here with `run`."""

    def launch(self, prepared: PreparedStep, run: Callable[[PreparedStep], StepHandle]) -> StepHandle: ...


class ModelRunner:
    def __init__(self, loaded: LoadedModel, ops: Ops, cfg: EngineConfig, num_blocks: int,
                 staging_depth: int = DEFAULT_STAGING_DEPTH, use_kernels: bool | None = None,
                 draft_checkpoint: LoadedModel | None = None) -> None:
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
        spec = spec_config_of(cfg)
        self.limits = BatchLimits(
            max_tokens=cfg.max_num_batched_tokens,
            max_rows=cfg.max_num_seqs,
            max_blocks=-(-self.max_model_len // cfg.block_size),
            block_size=cfg.block_size,
            num_blocks=num_blocks,
            max_model_len=self.max_model_len,
            vocab_size=loaded.config.vocab_size,
            verify_columns=spec.columns if spec.enabled else 1,
        )
        # One block more than the scheduler knows of: padding rows of a captured
        # decode step write their keys and values there, never into a request's.
        self.kv_caches = self.model.allocate_kv_caches(num_blocks + 1, cfg.block_size)
        self._spare_slot = num_blocks * cfg.block_size
        # use_kernels None: the CUDA step kernels wherever they run (False: the ops path)
        self.inputs = DeviceInputs(ops, self.limits, use_kernels)
        # logits are the model dtype's values in float32: sorting them in that dtype is exact
        self.sampler = Sampler(ops, loaded.config.vocab_size, sort_dtype=self.model.dtype)
        self._stager = StepStager(self.limits)
        # speculative "draft": drafts made on the device before each verify step's forward
        self.drafter = spec_drafter.Drafter(
            ops, build_draft_model(cfg, loaded, ops, self.kv_caches, num_blocks, draft_checkpoint), self.limits,
            spec.num_tokens) if spec.method == "draft" else None
        self._pool = StagingPool(self.limits, staging_depth, ops.host_zeros)
        self._lock = threading.Lock()  # prepare may run beside launch/collect
        self._prepared = 0
        self._launched = 0
        self.graphs: DecodeGraphs | None = None
        self.parallel: StepLauncher | None = None  # set on rank 0 of a tensor-parallel group
        capture = getattr(ops, "capture_graph", None)
        if ops.device == "gpu" and capture is not None and os.environ.get("OVERLAPD_CUDA_GRAPHS", "1") != "0":
            self.enable_graphs(capture)

    def enable_graphs(self, capture: CaptureFn) -> None:
        """Replay decode steps from graphs captured with `capture`."""
        seeds = self.inputs.sampling.seed_state

        def capture_keeping_seeds(fn):
            # A capture runs the body once (a warm-up) before the first replay
            # runs it again; a sampled body advances the seed states in place,
            # so they are put back: the replay is the step's one advance.
            saved = self.ops.add(seeds, 0)
            graph = capture(fn)
            self.ops.copy_(seeds, saved)
            return graph

        self.graphs = DecodeGraphs(capture_keeping_seeds, self.limits.step_rows, self.limits.max_blocks)

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
            draft = spec_drafter.stage(so, counts.spec_rows, buf.query_start_loc, self._stager.slots) \
                if self.drafter is not None and buf is not None else None
            return PreparedStep(self._prepared, so.step_id, req_ids, counts, any_random, num_logprobs, buf, draft)

    def prepare_staged(self, step_id: int, fill: Callable[[StagingBuffer], StagedCounts], any_random: bool,
                       num_logprobs: int) -> PreparedStep:
        """A step staged by another process (a tensor-parallel worker's copy of
        rank 0's step): `fill` writes it into a pooled buffer."""
        with self._lock:
            buf = self._pool.acquire()
            try:
                counts = fill(buf)
            except BaseException:
                self._pool.release(buf)
                raise
            self._prepared += 1
            return PreparedStep(self._prepared, step_id, np.zeros(0, np.uint64), counts, any_random, num_logprobs,
                                buf)

    def launch(self, prepared: PreparedStep) -> StepHandle:
        if prepared.seq != self._launched + 1:
            raise RuntimeError(f"steps must be launched in the order they were prepared: expected "
                               f"#{self._launched + 1}, got #{prepared.seq}")
        self._launched = prepared.seq
        if prepared.buf is None:
            return StepHandle(prepared, None, None)
        try:
            if self.parallel is not None:  # tensor parallelism: the workers get the step, then every rank runs it
                return self.parallel.launch(prepared, self._run)
            return self._run(prepared)
        except BaseException:
            self._pool.release(prepared.buf)  # a failed step must not leak its staging buffer
            prepared.buf = None
            raise

    def _run(self, prepared: PreparedStep) -> StepHandle:
        inp, n, buf = self.inputs, prepared.counts, prepared.buf
        assert buf is not None
        r, k = n.num_rows, prepared.num_logprobs
        width = logprob_width(k, MAX_LOGPROBS, self.limits.vocab_size)
        key = self._graph_key(prepared, width)
        if key is None:
            inp.load(buf, n)
            self._draft(prepared)
            out = self._body(n.num_tokens, r, n.query_lens, n.seq_lens, prepared.any_random, width, padded=False,
                             verify=prepared.verifies)
        else:
            rows, blocks, sampled, _, verify = key
            _pad_decode_rows(buf, r, rows, inp.pad_slot)
            inp.load(buf, n)
            self._draft(prepared)
            # Host facts the capture sees: `rows` one-token rows over `blocks` blocks.
            qlens = np.ones(rows, np.int64)
            seqlens = np.full(rows, blocks * self.block_size, np.int64)
            assert self.graphs is not None
            out = self.graphs.run(key, lambda: self._body(rows, rows, qlens, seqlens, sampled, width, padded=True,
                                                          verify=verify))
        # this step's rows and its largest k of the `width` candidates (the copy packs a view);
        # a verify step's draft matches are its last column: all come home
        columns = out.ints.shape[1] if prepared.verifies else (3 + k if k else 2)
        return StepHandle(
            prepared,
            self.ops.to_host_async(_head(out.ints, r, columns)),
            self.ops.to_host_async(_head(out.logprobs, r, k + 1)) if out.logprobs is not None and k else None,
        )

    def _draft(self, p: PreparedStep) -> None:
        """The draft method's drafts, made on the device after the step's inputs
        are loaded: into the verify columns' input ids and the drafts they must match."""
        if p.draft is None:
            return
        assert self.drafter is not None
        self.drafter.run(p.draft, self.inputs)

    def _graph_key(self, p: PreparedStep, width: int) -> GraphKey | None:
        """The graph of a decode step (every row one token that samples); None: run eagerly."""
        n = p.counts
        if self.graphs is None or n.num_rows == 0 or n.num_tokens != n.num_rows:
            return None
        assert p.buf is not None
        if not p.buf.sample_mask[: n.num_rows].all():
            return None
        return self.graphs.key(n.num_rows, int(n.seq_lens.max()), self.block_size, p.any_random, width, p.verifies)

    def _body(self, num_tokens: int, r: int, query_lens: np.ndarray, seq_lens: np.ndarray, any_random: bool,
              num_logprobs: int, padded: bool, verify: bool = False) -> SamplerOutput:
        """Forward and sampling over the persistent inputs: device work only, no
        host reads and no uploads on the decode path, so a graph can capture it."""
        ops, inp = self.ops, self.inputs
        meta = build_attention_metadata(
            ops,
            num_tokens=num_tokens,
            block_size=self.block_size,
            query_start_loc=inp.query_start_loc[: r + 1],
            start_pos=inp.start_pos[:r],
            seq_lens=inp.seq_lens[:r],
            row_slots=inp.row_slots[:r],
            block_tables=inp.block_tables,
            query_lens_host=query_lens,
            seq_lens_host=seq_lens,
        )
        if padded:  # padding rows (sample_mask 0) write to the spare block
            meta.slot_mapping = ops.where(ops.gt(inp.sample_mask[:r], 0), meta.slot_mapping, self._spare_slot)
        hidden = self.model.forward(inp.input_ids[:num_tokens], meta, self.kv_caches)
        logits = self.model.compute_logits(hidden, ops.sub(inp.query_start_loc[1: r + 1], 1))
        slots, mask, column = inp.row_slots[:r], inp.sample_mask[:r], inp.column[:r]
        params = inp.sampling.build(slots, mask, column, advance=any_random)
        sampled = self.sampler.sample(logits, params, any_random=any_random)
        finish = inp.stops.finish_codes(sampled, slots, mask, inp.out_index[:r])
        out = self.sampler.pack(logits, sampled, finish, num_logprobs)
        if verify:  # did each verify column draw its draft? (stages/spec/verify.py; the ops layer has no ==)
            drafts = inp.draft_ids[:r]
            drew = ops.cast(ops.where(ops.logical_and(ops.ge(sampled, drafts), ops.le(sampled, drafts)), 1, 0), INT64)
            # seed states move on by the tokens each verify row emits; lags for the rows chained on them
            inp.settle_verified_(r, drew, advance=any_random)
            out.ints = ops.concat([out.ints, ops.reshape(drew, [r, 1])], axis=1)
        ops.copy_(inp.prev_sampled, sampled)  # the next launch's decode inputs
        return out

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
        if p.counts.spec_rows is not None:
            return _verified_output(p, ints, lps)
        return StepOutput(
            step_id=p.step_id,
            req_ids=p.req_ids,
            sampled=ints[:, 0].astype(np.int32),
            k=k,
            logprobs=lps.astype(np.float32) if lps is not None else None,
            top_ids=ints[:, 3: 3 + k].astype(np.int32) if k else None,
            ranks=ints[:, 2].astype(np.int32) if k else None,
            finish=ints[:, 1].astype(np.int32),
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


def _pad_decode_rows(buf: StagingBuffer, r: int, rows: int, pad_slot: int) -> None:
    """Stage rows r..rows-1 of a padded decode step: one token at position 0 in
    the spare slot `pad_slot` (no request's: a sampled step's seed advance
    must not scatter into a real row's slot twice), never sampled (their KV
    writes go to the spare block, their outputs are dropped). The whole
    per-step array is copied to the device anyway."""
    if rows == r:
        return
    buf.query_start_loc[r + 1: rows + 1] = np.arange(r + 1, rows + 1)
    buf.input_ids[r:rows] = 0
    buf.prev_rows[r:rows] = -1
    buf.start_pos[r:rows] = 0
    buf.seq_lens[r:rows] = 1
    buf.row_slots[r:rows] = pad_slot
    buf.sample_mask[r:rows] = 0
    buf.out_index[r:rows] = 0
    buf.column[r:rows] = -1
    buf.lagged[r:rows] = 0


def _head(x: Any, rows: int, cols: int) -> Any:
    """x[:rows, :cols], without a slice where that is all of x."""
    return x if tuple(x.shape) == (rows, cols) else x[:rows, :cols]


def _verified_output(p: PreparedStep, ints: np.ndarray, lps: np.ndarray | None) -> StepOutput:
    """A verify step's output by scheduled row: column 0 where plain rows read,
    every column's token and logprobs where verify rows read."""
    assert p.counts.spec_rows is not None
    k = p.num_logprobs
    v = spec_verify.contract(ints, lps, p.counts.spec_rows, k)
    return StepOutput(
        step_id=p.step_id,
        req_ids=p.req_ids,
        sampled=v.sampled,
        k=k,
        logprobs=v.logprobs[:, 0] if v.logprobs is not None else None,
        top_ids=v.top_ids[:, 0] if v.top_ids is not None else None,
        ranks=v.ranks[:, 0] if v.ranks is not None else None,
        finish=v.finish,
        accept_num=v.accept_num,
        spec_tokens=v.tokens,
        spec_logprobs=v.logprobs,
        spec_top_ids=v.top_ids,
        spec_ranks=v.ranks,
    )


def _empty_output(step_id: int) -> StepOutput:
    return StepOutput(step_id=step_id, req_ids=np.zeros(0, np.uint64), sampled=np.zeros(0, np.int32),
                      k=0, logprobs=None, top_ids=None, ranks=None)
