"""Prefix caching on the real engine (tiny model, Paddle on the CPU): the same
tokens with the cache on as off, greedy and seeded, also when a small KV pool
forces cached blocks out and requests to be preempted and recomputed."""

from __future__ import annotations

import pytest
from overlapd.stages.engine.config import EngineConfig
from overlapd.stages.engine.llm_engine import LLMEngine
from overlapd.stages.step_types import SamplingParams

from engine_test_support import tiny_cache  # noqa: F401

pytestmark = pytest.mark.usefixtures("tiny_cache")

MAX_LEN = 128
BLOCK = 4
SYSTEM = "You are a terse assistant. Answer in one line, cite nothing, and never repeat the question. "
QUESTIONS = ["what is a cat", "name a colour", "two plus two", "the capital of France", "say hello", "why is the sky"]
PARAMS = [
    SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    if i % 2 == 0 else SamplingParams(temperature=0.9, top_p=0.9, seed=100 + i, max_tokens=10, ignore_eos=True)
    for i in range(len(QUESTIONS))
]


def make_engine(overlap: bool, **kw) -> LLMEngine:
    cfg = dict(model="tiny", max_model_len=MAX_LEN, block_size=BLOCK, max_num_seqs=4, max_num_batched_tokens=32, seed=5)
    cfg.update(kw)
    return LLMEngine(EngineConfig(**cfg), overlap=overlap)


def chat(eng: LLMEngine) -> list[list[int]]:
    """Two turns of six conversations sharing a system prompt: turn 2 resends
    turn 1 and its answer. Returns every answer's tokens, turn 1 then turn 2."""
    tok = eng.tokenizer
    system = tok.encode(SYSTEM)
    turn1 = [system + tok.encode(q) for q in QUESTIONS]
    answers1 = [r.token_ids for r in eng.generate(turn1, PARAMS)]
    turn2 = [p + a + tok.encode(" and then?") for p, a in zip(turn1, answers1)]
    answers2 = [r.token_ids for r in eng.generate(turn2, PARAMS)]
    return answers1 + answers2


@pytest.fixture(scope="module")
def uncached() -> list[list[int]]:
    eng = make_engine(False, prefix_cache=False)
    out = chat(eng)
    s = eng.scheduler.stats
    assert s.prefix_hit_tokens == 0 and s.num_blocks_cached == 0
    return out


@pytest.mark.parametrize("overlap", [False, True])
def test_cached_outputs_equal_uncached(uncached, overlap: bool) -> None:
    eng = make_engine(overlap)
    assert chat(eng) == uncached
    s = eng.scheduler.stats
    assert s.prefix_hit_tokens > 0.5 * s.prefix_queried_tokens  # the system prompt and turn 1 were found
    assert s.prompt_tokens_computed < s.prefix_queried_tokens - s.prefix_hit_tokens + 6 * 2  # and not computed
    bm = eng.scheduler.block_manager
    assert s.num_blocks_used == 0 and s.num_blocks_free + s.num_blocks_evictable == eng.num_blocks
    assert s.num_blocks_cached == s.num_blocks_evictable > 0
    bm.check()


@pytest.mark.parametrize("overlap", [False, True])
def test_eviction_and_preemption_keep_outputs_identical(uncached, overlap: bool) -> None:
    # 40 blocks of 4: the four running conversations of turn 2 (~30 blocks
    # each with their answers) cannot all fit, so cached blocks are evicted
    # and requests preempted and recomputed, partly from the cache.
    eng = make_engine(overlap, num_blocks=40)
    assert chat(eng) == uncached
    bm = eng.scheduler.block_manager
    assert bm.num_evictions > 0, "the pool never drained: the test proves nothing"
    s = eng.scheduler.stats
    assert s.num_preemptions > 0 and s.prefix_hit_tokens > 0
    assert s.num_blocks_used == 0 and s.num_blocks_free + s.num_blocks_evictable == eng.num_blocks
    bm.check()


class Collect:
    """A RequestSink keeping tokens and how the request ended."""

    def __init__(self, loop) -> None:
        self.tokens: list[int] = []
        self.end = loop.create_future()

    def on_tokens(self, token_ids, text, logprobs) -> None:
        self.tokens.extend(token_ids)

    def on_done(self, finish_reason: str, prompt_tokens: int, completion_tokens: int) -> None:
        self.end.set_result(finish_reason)

    def on_error(self, code: str, message: str) -> None:
        self.end.set_result(code)


def test_a_failed_step_empties_the_cache_and_serving_goes_on() -> None:
    """A failed step may not have written blocks that were already keyed: the
    pipeline forgets every prefix, and the next request computes from scratch
    to the same tokens."""
    import asyncio

    from overlapd.daemon.engine_api import GenerateParams
    from overlapd.stages.pipeline import Pipeline
    from overlapd.stages.pipeline_config import PipelineConfig, RingConfig

    async def main() -> None:
        cfg = EngineConfig(model="tiny", max_model_len=MAX_LEN, block_size=BLOCK)
        p = Pipeline(cfg, PipelineConfig(), RingConfig(enabled=False))
        await p.start()
        loop = asyncio.get_running_loop()
        params = GenerateParams(prompt=SYSTEM, max_tokens=6, temperature=0.0, ignore_eos=True)

        async def run() -> Collect:
            sink = Collect(loop)
            p.submit(params, sink)
            await asyncio.wait_for(sink.end, 30)
            await asyncio.sleep(0.05)  # the stats settle after the last frame
            return sink

        first = await run()
        assert first.end.result() == "length" and p.stats()["kv_blocks_cached"] > 0
        real_run = p.engine.runner._run

        def fail_once(prepared):
            p.engine.runner._run = real_run
            raise RuntimeError("injected: the device failed this step")

        p.engine.runner._run = fail_once
        failed = await run()
        assert failed.end.result() == "internal"
        s = p.stats()
        assert s["kv_blocks_cached"] == 0 and s["kv_blocks_used"] == 0 and s["kv_blocks_free"] == s["kv_blocks_total"]
        hits = s["prefix_cache_hit_tokens"]
        again = await run()
        assert again.tokens == first.tokens and p.stats()["prefix_cache_hit_tokens"] == hits  # nothing found
        await p.drain(timeout=5)

    asyncio.run(asyncio.wait_for(main(), 120))
