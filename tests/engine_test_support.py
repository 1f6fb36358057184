"""Shared pieces for the execute-side tests: the tiny model and a hand-driven runner.

The scheduler is another module's job, so these tests drive ModelRunner with
SchedulerOutputs built here, with KV blocks allocated by hand (`Driver`).
Fixtures are imported by name into the test modules that use them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import pytest

from overlapd.stages.engine.config import EngineConfig
from overlapd.stages.model.loader import LoadedModel, load_model
from overlapd.stages.model.reference import reference_logits
from overlapd.stages.model.tiny import tiny_checkpoint
from overlapd.stages.runner.model_runner import ModelRunner, StepHandle
from overlapd.stages.runtime import load_runtime
from overlapd.stages.runtime.ops import Ops
from overlapd.stages.step_types import SamplingParams, ScheduledRow, SchedulerOutput, StepOutput

GREEDY = SamplingParams(temperature=0.0, max_tokens=16)


@lru_cache(maxsize=1)
def get_ops() -> Ops:
    return load_runtime("paddle", "cpu")


@lru_cache(maxsize=1)
def tiny_in_memory() -> tuple:
    """(config, HF-named float32 weights, tokenizer.json text) of the tiny model."""
    return tiny_checkpoint()


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory: pytest.TempPathFactory):
    """Points the checkpoint cache at a temp dir for the whole session."""
    old = os.environ.get("OVERLAPD_CACHE_DIR")
    os.environ["OVERLAPD_CACHE_DIR"] = str(tmp_path_factory.mktemp("overlapd-cache"))
    yield os.environ["OVERLAPD_CACHE_DIR"]
    if old is None:
        os.environ.pop("OVERLAPD_CACHE_DIR", None)
    else:
        os.environ["OVERLAPD_CACHE_DIR"] = old


def engine_config(**kw: object) -> EngineConfig:
    base = dict(model="tiny", max_num_seqs=8, max_num_batched_tokens=64, max_model_len=256, block_size=4)
    base.update(kw)
    return EngineConfig(**base)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def tiny_loaded(tiny_cache: str) -> LoadedModel:
    return load_model(engine_config(), get_ops())


def make_runner(loaded: LoadedModel, num_blocks: int = 128, **kw: object) -> ModelRunner:
    return ModelRunner(loaded, get_ops(), engine_config(**kw), num_blocks)


def reference_greedy_tokens(prompt: list[int], n: int) -> list[int]:
    config, weights, _ = tiny_in_memory()
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(np.argmax(reference_logits(config, weights, ids)[-1])))
    return ids[len(prompt):]


@dataclass
class Req:
    req_id: int
    prompt: list[int]
    params: SamplingParams = GREEDY
    seed: int = 0
    outputs: list[int | None] = field(default_factory=list)  # None: sampled, not collected yet
    logprob_rows: list[tuple[np.ndarray, np.ndarray, int]] = field(default_factory=list)
    computed: int = 0  # tokens whose KV is in the cache
    blocks: list[int] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return len(self.outputs) >= self.params.max_tokens


class Driver:
    """A minimal stand-in for the scheduler: token budget, chunked prefill,
    hand-allocated blocks, preemption by recompute, and an overlap mode where
    decode inputs come from the previous launch (from_prev_step)."""

    def __init__(self, runner: ModelRunner, token_budget: int | None = None) -> None:
        self.runner = runner
        self.bs = runner.block_size
        self.budget = token_budget or runner.limits.max_tokens
        self.free_blocks = list(range(runner.num_blocks - 1, -1, -1))  # pop() gives low ids first
        self.reqs: dict[int, Req] = {}
        self.freed: list[int] = []
        self.step_id = 0

    def add(self, req: Req) -> Req:
        self.reqs[req.req_id] = req
        return req

    def preempt(self, req_id: int) -> None:
        r = self.reqs[req_id]
        self.free_blocks.extend(r.blocks)
        r.blocks, r.computed = [], 0
        self.freed.append(req_id)

    def schedule(self) -> tuple[SchedulerOutput, list[tuple[Req, bool]]]:
        self.step_id += 1
        rows, info, left = [], [], self.budget
        for r in self.reqs.values():
            if r.done or left == 0:
                continue
            seq = r.prompt + r.outputs
            pending = seq[r.computed:]
            if r.computed >= len(r.prompt) and len(pending) == 1 and pending[0] is None:
                tokens, from_prev = [-1], True
            else:
                assert None not in pending, "cannot recompute a token that is still in flight"
                tokens, from_prev = pending[:left], False
            end = r.computed + len(tokens)
            while len(r.blocks) * self.bs < end:
                r.blocks.append(self.free_blocks.pop())
            sample = end == len(seq)
            rows.append(ScheduledRow(r.req_id, list(tokens), r.computed, from_prev, sample,
                                     len(r.outputs), list(r.blocks), r.params, r.seed))
            info.append((r, sample))
            r.computed = end
            if sample:
                r.outputs.append(None)
            left -= len(tokens)
        so = SchedulerOutput(self.step_id, rows, self.freed)
        self.freed = []
        return so, info

    def apply(self, out: StepOutput, info: list[tuple[Req, bool]]) -> None:
        for i, (r, sample) in enumerate(info):
            if not sample:
                continue
            slot = r.outputs.index(None)
            r.outputs[slot] = int(out.sampled[i])
            if out.k:
                r.logprob_rows.append((out.logprobs[i].copy(), out.top_ids[i].copy(), int(out.ranks[i])))
        for r, _ in info:
            if r.done and None not in r.outputs and r.blocks:
                self.free_blocks.extend(r.blocks)
                r.blocks = []
                self.freed.append(r.req_id)

    def step(self) -> StepOutput:
        so, info = self.schedule()
        out = self.runner.execute(so)
        self.apply(out, info)
        return out

    def run(self, max_steps: int = 500) -> None:
        for _ in range(max_steps):
            if all(r.done for r in self.reqs.values()):
                return
            self.step()
        raise AssertionError("requests did not finish")

    def run_overlapped(self, max_steps: int = 500) -> None:
        """Launch step N+1 before collecting step N, as the pipeline's overlap mode does."""
        in_flight: tuple[StepHandle, list] | None = None
        for _ in range(max_steps):
            busy = [r for r in self.reqs.values() if not r.done]
            if not busy and in_flight is None:
                return
            launched = None
            if busy:
                so, info = self.schedule()
                launched = (self.runner.launch(self.runner.prepare(so)), info)
            if in_flight is not None:
                self.apply(self.runner.collect(in_flight[0]), in_flight[1])
            in_flight = launched
        raise AssertionError("requests did not finish")


def run_checking_verify_blocks(e, req, block_size: int) -> int:
    """Steps a speculative LLMEngine to the end, checking after each step that
    the request's KV and blocks cover its known tokens and nothing more (the
    rejected drafts' positions and blocks were given back); returns the drafts rejected."""
    rejected = 0
    while e.has_work():
        before = e.spec.stats.snapshot()
        e.step()
        after = e.spec.stats.snapshot()
        if not req.is_finished:
            # the host's view: KV for prompt + outputs but the newest, and no block beyond it
            assert req.num_computed_tokens == req.num_tokens - 1
            assert len(req.block_ids) == -(-req.num_computed_tokens // block_size)
            assert e.scheduler.num_used_blocks == len(req.block_ids)
        rejected += (after["spec_proposed"] - before["spec_proposed"]) - (after["spec_accepted"] - before["spec_accepted"])
    return rejected

