"""LLMEngine end to end on the tiny model (Paddle on the CPU): real scheduler, runner, detokenizer."""

from __future__ import annotations


import numpy as np
import pytest
from overlapd.stages.engine.config import EngineConfig
from overlapd.stages.engine.llm_engine import LLMEngine
from overlapd.stages.model.reference import reference_logits
from overlapd.stages.model.tiny import tiny_checkpoint
from overlapd.stages.request import InvalidRequest
from overlapd.stages.step_types import FinishReason, SamplingParams

from engine_test_support import tiny_cache  # noqa: F401

MAX_LEN = 64
BLOCK = 4
PROMPTS = [
    "hello",
    "héllo wörld 日本語 🎉",
    "the quick brown fox jumps over the lazy dog and keeps on running",
    "a",
    "one two three four five six seven",
    "naïve café",
]
PARAMS = [
    SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True),
    SamplingParams(temperature=0.9, top_k=20, top_p=0.9, seed=1234, max_tokens=18, ignore_eos=True),
    SamplingParams(temperature=0.0, max_tokens=16, logprobs=3, ignore_eos=True),
    SamplingParams(temperature=1.0, seed=7, max_tokens=24, ignore_eos=True),
    SamplingParams(temperature=0.7, top_p=0.8, max_tokens=20, ignore_eos=True),  # seed from EngineConfig.seed
    SamplingParams(temperature=0.0, max_tokens=22),
]


pytestmark = pytest.mark.usefixtures("tiny_cache")  # the tiny checkpoint goes to a temp dir


def config(**kw) -> EngineConfig:
    base = dict(model="tiny", max_model_len=MAX_LEN, block_size=BLOCK, max_num_seqs=8, max_num_batched_tokens=24, seed=5)
    base.update(kw)
    return EngineConfig(**base)


_engines: dict[tuple, LLMEngine] = {}


def engine(overlap: bool, **kw) -> LLMEngine:
    """One engine per configuration for the module (loading is the slow part)."""
    key = (overlap, tuple(sorted(kw.items())))
    if key not in _engines:
        _engines[key] = LLMEngine(config(**kw), overlap=overlap)
    eng = _engines[key]
    assert not eng.has_work()
    return eng


@pytest.fixture(scope="module")
def baseline():
    eng = engine(False)
    return eng.generate(PROMPTS, PARAMS)


def test_greedy_generate_matches_a_full_recompute_reference(baseline) -> None:
    config_, weights, _ = tiny_checkpoint()
    for i in (0, 2, 5):
        res = baseline[i]
        assert res.finish_reason in (FinishReason.LENGTH, FinishReason.EOS)
        seq = res.prompt_token_ids + res.token_ids
        logits = reference_logits(config_, weights, seq)
        n = len(res.prompt_token_ids)
        want = np.argmax(logits[n - 1 : len(seq) - 1], axis=-1).tolist()
        assert res.token_ids == want, f"prompt {i}"
        assert res.text == engine(False).tokenizer.decode(res.token_ids)


def test_logprobs_come_back_trimmed(baseline) -> None:
    res = baseline[2]
    assert res.logprobs is not None and len(res.logprobs) == len(res.token_ids)
    for lp, tok in zip(res.logprobs, res.token_ids):
        assert lp.token_id == tok and lp.rank == 1 and len(lp.top) == 3  # greedy: the sampled token is the best
        assert lp.top[0][0] == tok and lp.top[0][1] == pytest.approx(lp.logprob, abs=1e-5)
    assert baseline[0].logprobs is None


def test_overlap_gives_identical_tokens(baseline) -> None:
    eng = engine(True)
    got = eng.generate(PROMPTS, PARAMS)
    for a, b in zip(baseline, got):
        assert b.token_ids == a.token_ids and b.text == a.text and b.finish_reason == a.finish_reason
    for x, y in zip(baseline[2].logprobs, got[2].logprobs):
        assert x.logprob == pytest.approx(y.logprob, abs=1e-5) and [t for t, _ in x.top] == [t for t, _ in y.top]


@pytest.mark.parametrize("overlap", [False, True])
def test_preemption_under_a_tiny_kv_budget_gives_identical_outputs(baseline, overlap: bool) -> None:
    # 16 blocks of 4 = one full-length request: six requests of up to 48 positions must take turns.
    eng = engine(overlap, num_blocks=MAX_LEN // BLOCK)
    before = eng.scheduler.stats.num_preemptions
    got = eng.generate(PROMPTS, PARAMS)
    assert eng.scheduler.stats.num_preemptions > before
    assert [r.token_ids for r in got] == [r.token_ids for r in baseline]
    assert [r.text for r in got] == [r.text for r in baseline]
    assert eng.scheduler.num_used_blocks == 0


@pytest.mark.parametrize("overlap", [False, True])
def test_abort_frees_every_block(overlap: bool) -> None:
    eng = engine(overlap)
    ids = [eng.add_request(p, SamplingParams(max_tokens=30, seed=3, ignore_eos=True)) for p in PROMPTS[:4]]
    seen: dict[int, int] = {}
    for _ in range(4):
        for out in eng.step():
            seen[out.req_id] = seen.get(out.req_id, 0) + len(out.new_token_ids)
    assert eng.scheduler.num_used_blocks > 0
    if overlap:  # decodes in flight take their input from the previous launch
        assert eng.in_flight is not None and all(r.from_prev_step for r in eng.in_flight.rows)
    finals = [eng.abort(rid) for rid in ids]
    assert all(f is not None and f.finish_reason is FinishReason.ABORTED for f in finals)
    assert [f.completion_tokens for f in finals] == [seen.get(rid, 0) for rid in ids]
    assert eng.scheduler.num_used_blocks == 0 and eng.scheduler.num_running == 0
    assert eng.abort(ids[0]) is None
    while eng.has_work():  # the step in flight (overlap) lands and is dropped
        assert eng.step() == []
    bm = eng.scheduler.block_manager  # every block free, or kept evictable by the prefix cache
    assert bm.num_free_blocks + bm.num_evictable_blocks == eng.num_blocks and bm.num_used_blocks == 0


def test_stop_string_from_the_text_ends_the_request(baseline) -> None:
    text = baseline[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop.strip(), "pick a stop string with visible characters"
    (res,) = engine(False).generate(
        [PROMPTS[0]], SamplingParams(temperature=0.0, max_tokens=20, stop=(stop,), ignore_eos=True)
    )
    assert res.finish_reason is FinishReason.STOP
    assert res.text == text[: text.find(stop)]
    assert res.token_ids == baseline[0].token_ids[: len(res.token_ids)]
    assert engine(False).scheduler.num_used_blocks == 0


def test_bad_requests_are_refused_naming_the_field() -> None:
    eng = engine(False)
    with pytest.raises(InvalidRequest) as e:
        eng.add_request("x " * 80, SamplingParams(max_tokens=4))
    assert e.value.field == "prompt"
    with pytest.raises(InvalidRequest) as e:
        eng.add_request("hello", SamplingParams(max_tokens=0))
    assert e.value.field == "max_tokens"
    with pytest.raises(InvalidRequest) as e:
        eng.add_request("hello", SamplingParams(top_p=0))
    assert e.value.field == "top_p"
    assert not eng.has_work()
