"""Speculative decoding with a draft network (`speculative = "draft"`): real model code on the CPU.

Greedy output with drafts made on the device must equal plain greedy output
token for token, with overlap and without, for the self-draft (the target's
first layers) and for a separate draft checkpoint. With the target itself as
the draft model every draft must be accepted: a mistake in the draft's KV
bookkeeping (its catch-up over a prompt in budget-sized chunks, after
preemption, after a prefix-cache hit, after each verify step) shows up as a
rejected draft. The self-draft's accept counts must equal a float64
reference run of the same drafting. Blocks of rejected drafts go back to the
pool; a draft model with another vocabulary is refused, naming both.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil

import numpy as np
import pytest
from engine_test_support import run_checking_verify_blocks
from safetensors.numpy import load_file

from overlapd.kernels.meta import FLAG_SPECULATIVE
from overlapd.stages.engine.config import DEFAULT_MODEL, EngineConfig
from overlapd.stages.engine.llm_engine import LLMEngine
from overlapd.stages.model.config import LlamaConfig
from overlapd.stages.model.loader import ModelLoadError
from overlapd.stages.model.reference import reference_logits
from overlapd.stages.model.tiny import ensure_tiny_checkpoint
from overlapd.stages.step_types import SamplingParams

K = 4
PROMPTS = [
    [5, 6, 7, 8, 9] * 4 + [5, 6],
    list(range(3, 40)) * 2 + [3, 4],  # 76 tokens: longer than a 24-token budget
    [11, 12, 13] * 5,
    [21, 22, 23, 24, 25, 26, 27, 28],
]
LONG = [p * 2 for p in PROMPTS]  # 16 blocks of 16 cannot hold all four at once


def engine(*, overlap: bool = False, **kw: object) -> LLMEngine:
    return LLMEngine(EngineConfig(model="tiny", speculative="draft", num_speculative_tokens=K, **kw),  # type: ignore[arg-type]
                     overlap=overlap)


def greedy(max_tokens: int = 32, **kw: object) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **kw)  # type: ignore[arg-type]


def run(e: LLMEngine, params: SamplingParams | list[SamplingParams], prompts: list[list[int]] = PROMPTS):
    """Token ids per prompt, and the most tokens one ring row carried per prompt."""
    ids = [e.add_request(p, params if isinstance(params, SamplingParams) else params[i]) for i, p in enumerate(prompts)]
    tokens: dict[int, list[int]] = {i: [] for i in ids}
    widest = dict.fromkeys(ids, 0)
    while e.has_work():
        for out in e.step():
            tokens[out.req_id] += out.new_token_ids
        ring = e.last_result.ring if e.last_result is not None else None
        if ring is not None and ring.bsz:
            assert ring.flag != FLAG_SPECULATIVE or ring.tokens.shape[1] == K + 1
            for i, rid in enumerate(ring.request_id.tolist()):
                widest[rid] = max(widest[rid], int(ring.accept_num[i]))
    return [tokens[i] for i in ids], [widest[i] for i in ids]


def nothing_held(e: LLMEngine) -> bool:
    bm = e.scheduler.block_manager
    bm.check()
    return bm.num_available_blocks == bm.num_blocks  # cached prefixes stay evictable, none held


@pytest.fixture(scope="module")
def plain():
    e = LLMEngine(EngineConfig(model="tiny", max_model_len=256))
    return {"short": run(e, greedy())[0], "long": run(e, greedy(), LONG)[0]}


@pytest.mark.parametrize("overlap", [False, True], ids=["sync", "overlap"])
def test_self_draft_greedy_equals_plain(overlap, plain):
    e = engine(overlap=overlap, speculative_draft_layers=1)
    got, widest = run(e, greedy())
    assert got == plain["short"]
    stats = e.spec.stats.snapshot()
    assert stats["spec_verify_rows"] > 0 and stats["spec_proposed"] >= stats["spec_verify_rows"]
    assert e.runner.drafter.draft.name == "self:1" and e.runner.drafter.draft.shares_target_kv
    assert nothing_held(e)


def _tiny_reference():
    path = ensure_tiny_checkpoint()
    # float64 once: reference_logits would convert every weight on every call
    return LlamaConfig.from_dir(path), {k: v.astype(np.float64) for k, v in load_file(str(path / "model.safetensors")).items()}


def test_self_draft_drafts_what_a_reference_model_drafts():
    """The drafts the device wrote into each verify step's input ids must be
    the greedy tokens of the float64 reference model cut to its first layer,
    fed the request's known sequence and the drafts before them."""
    config, weights = _tiny_reference()
    first_layer = dataclasses.replace(config, num_hidden_layers=1)
    e = engine(speculative_draft_layers=1)
    checked = 0
    for prompt in PROMPTS[::2]:  # the short ones: the reference recomputes the whole sequence per token
        req = e.scheduler.get_request(e.add_request(prompt, greedy(24)))
        while e.has_work():
            known = prompt + req.output_token_ids
            proposed = e.spec.stats.proposed
            e.step()  # sync: the step's inputs stay in the runner's device buffers until the next one
            k = e.spec.stats.proposed - proposed
            if not k:
                continue
            ids = e.runner.ops.to_numpy(e.runner.inputs.input_ids)[: 1 + k].tolist()
            assert ids[0] == known[-1]
            for j in range(k):
                logits = reference_logits(first_layer, weights, known + ids[1: 1 + j])
                assert ids[1 + j] == int(np.argmax(logits[-1])), (known, ids, j)
            checked += k
    assert checked >= 40


# (engine settings, prompts, run them twice: the second time from the prefix cache)
CASES = {
    "plain": (dict(), PROMPTS, False),
    "catch-up in chunks": (dict(max_num_batched_tokens=24, max_num_seqs=4), PROMPTS, False),
    "preemption": (dict(num_blocks=16, max_model_len=256), LONG, False),
    "prefix-cache hits": (dict(block_size=4), PROMPTS, True),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("overlap", [False, True], ids=["sync", "overlap"])
def test_the_target_as_draft_model_accepts_every_draft(overlap, case, plain):
    settings, prompts, twice = CASES[case]
    e = engine(overlap=overlap, speculative_draft_model="tiny", **settings)
    assert not e.runner.drafter.draft.shares_target_kv
    got, widest = run(e, greedy(), prompts)
    if twice:
        again, widest = run(e, greedy(), prompts)
        assert again == got and e.scheduler.stats.prefix_hit_tokens > 0
    assert got == plain["long" if prompts is LONG else "short"]
    stats = e.spec.stats.snapshot()
    assert stats["spec_proposed"] > 0 and stats["spec_acceptance_rate"] == 1.0, stats
    # every request drafted, the one whose prompt outgrows a step's budget too
    assert min(widest) == K + 1
    if case == "preemption":
        assert e.scheduler.num_preemptions > 0, "the small pool never preempted: the case proves nothing"
    assert nothing_held(e)


@pytest.mark.parametrize("overlap", [False, True], ids=["sync", "overlap"])
def test_sampled_and_logprob_rows_draft_too_and_give_the_plain_tokens(overlap):
    # the draft is the target itself: greedy rows accept every draft; the
    # seeded sampled row accepts a draft when it draws the target's argmax
    params = [greedy(), SamplingParams(max_tokens=32, temperature=0.8, seed=7, ignore_eos=True),
              greedy(logprobs=2), greedy(speculative=False)]
    e = engine(overlap=overlap, speculative_draft_model="tiny")
    got, widest = run(e, params)
    want, _ = run(LLMEngine(EngineConfig(model="tiny"), overlap=overlap), params)
    assert got == want
    assert widest[0] == widest[2] == K + 1 and widest[3] == 1
    assert nothing_held(e)


def test_rejected_drafts_give_back_their_blocks():
    # block_size 4: a verify row of 1 + 4 positions spans a new block that
    # rejected drafts alone would hold; the first-layer draft is often wrong
    e = engine(speculative_draft_layers=1, block_size=4, num_blocks=256, max_model_len=256)
    rid = e.add_request(PROMPTS[1], greedy(max_tokens=40))
    req = e.scheduler.get_request(rid)
    rejections = run_checking_verify_blocks(e, req, 4)
    assert rejections > 0
    assert e.scheduler.block_manager.num_available_blocks == 256


def _copy_tiny(tmp_path, name: str, files: tuple[str, ...]):
    src, dst = ensure_tiny_checkpoint(), tmp_path / name
    dst.mkdir()
    for f in files:
        shutil.copy(src / f, dst / f)
    return dst


def test_a_draft_model_with_another_vocabulary_is_refused(tmp_path):
    # a larger vocabulary; no weights at all: it is refused before any is read
    other = _copy_tiny(tmp_path, "wide", ("config.json", "tokenizer.json"))
    config = json.loads((other / "config.json").read_text())
    config["vocab_size"] = 1000
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=re.escape(
            f"draft model '{other}' has a vocabulary of 1000 tokens, the target 'tiny' one of 768")):
        engine(speculative_draft_model=str(other))
    # the same size, another tokenizer (bytes, without tokenizer.json)
    other = _copy_tiny(tmp_path, "bytes", ("config.json", "model.safetensors"))
    with pytest.raises(ModelLoadError, match=re.escape(
            f"draft model '{other}' and the target 'tiny' have different tokenizers")):
        engine(speculative_draft_model=str(other))


def test_self_draft_layers_must_leave_the_target_deeper():
    with pytest.raises(ModelLoadError, match=re.escape(
            "speculative_draft_layers (4) must be between 1 and 3: the target has 4 layers")):
        engine(speculative_draft_layers=4)


def test_default_model_self_draft_greedy_equals_plain():
    """Real weights (SmolLM2-135M-Instruct, Paddle): its first 26 of 30 layers
    draft; one engine serves plain (speculative: false), sync and overlap."""
    e = LLMEngine(EngineConfig(model=DEFAULT_MODEL, speculative="draft", num_speculative_tokens=3,
                               speculative_draft_layers=26, max_model_len=512))
    chat = e.loaded.chat_template
    prompts = [chat.render([{"role": "user", "content": t}]) for t in (
        "Repeat this sentence twice: the lighthouse keeper climbed the stairs every evening.",
        "List the days of the week.",
        "What is the capital of France?")]
    plain = [r.token_ids for r in e.generate(prompts, SamplingParams(max_tokens=24, temperature=0.0,
                                                                       speculative=False))]
    assert e.spec.stats.verify_rows == 0
    for overlap in (False, True):
        e.overlap = overlap  # between generate() calls nothing is in flight
        got = [r.token_ids for r in e.generate(prompts, SamplingParams(max_tokens=24, temperature=0.0))]
        assert got == plain, f"overlap={overlap}"
    stats = e.spec.stats.snapshot()
    assert stats["spec_accepted"] > 0, stats
    assert nothing_held(e)


def test_a_separate_draft_models_cache_counts_in_kv_cache_bytes():
    """kv_cache_bytes bounds the target's KV cache and a separate draft model's
    together (both hold the same number of blocks); the self-draft shares the
    target's cache and costs nothing more."""
    from overlapd.stages.engine.sizing import kv_block_bytes

    plain = LLMEngine(EngineConfig(model="tiny", max_num_seqs=64))
    cfg, config = plain.cfg, plain.loaded.config
    block = kv_block_bytes(cfg, config)
    per_seq = -(-plain.max_model_len // cfg.block_size)
    budget = 4 * per_seq * block  # the binding limit: 64 full-length requests would need more
    plain.close()
    assert LLMEngine(EngineConfig(model="tiny", max_num_seqs=64, kv_cache_bytes=budget)).num_blocks == 4 * per_seq
    self_draft = engine(max_num_seqs=64, kv_cache_bytes=budget)
    assert self_draft.num_blocks == 4 * per_seq
    e = engine(speculative_draft_model="tiny", max_num_seqs=64, kv_cache_bytes=budget)
    assert kv_block_bytes(cfg, config, config) == 2 * block
    assert e.num_blocks == 2 * per_seq
    draft = e.runner.drafter.draft
    assert not draft.shares_target_kv and len(draft.kv_caches) == config.num_hidden_layers
    # and the engine still drafts with it: the draft is the target itself, so every draft holds
    tokens, _ = run(e, greedy(16))
    assert all(len(t) == 16 for t in tokens)
    assert e.spec.stats.accepted == e.spec.stats.proposed > 0
