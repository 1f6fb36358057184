"""Speculative decoding (ngram) in the engine: real model code on the CPU.

Output with speculation must equal output without it token for token, with
overlap and without: greedy, seeded sampled and logprob rows alike; verify rows emit several tokens per step and
the ring rows say so (flag 2, T = k + 1); stops apply inside a verify row's
tokens; every KV block is free again afterwards, also after preemption in the
middle of speculation.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
from engine_test_support import run_checking_verify_blocks

from overlapd.kernels.meta import FLAG_NORMAL, FLAG_SPECULATIVE, pack_step, unpack_step
from overlapd.stages.engine.config import DEFAULT_MODEL, EngineConfig
from overlapd.stages.engine.llm_engine import LLMEngine
from overlapd.stages.spec.ngram import SEARCH_WINDOW, TokenHistory, propose_ngram
from overlapd.stages.step_types import FinishReason, SamplingParams

K = 4
# Prompts that repeat themselves: prompt lookup finds drafts from the first step.
PROMPTS = [
    [5, 6, 7, 8, 9] * 4 + [5, 6],
    list(range(3, 40)) * 2 + [3, 4],
    [11, 12, 13] * 5,
    [21, 22, 23, 24, 25, 26, 27, 28],
]


def engine(spec: str = "ngram", *, overlap: bool = False, **kw: object) -> LLMEngine:
    return LLMEngine(EngineConfig(model="tiny", speculative=spec, num_speculative_tokens=K, **kw), overlap=overlap)


def greedy(max_tokens: int = 48, **kw: object) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **kw)


def run(e: LLMEngine, params: SamplingParams | list[SamplingParams], prompts: list[list[int]] = PROMPTS):
    """Token ids per prompt, and every step's ring rows."""
    ids = [e.add_request(p, params if isinstance(params, SamplingParams) else params[i]) for i, p in enumerate(prompts)]
    tokens: dict[int, list[int]] = {i: [] for i in ids}
    finish: dict[int, FinishReason | None] = {}
    rings = []
    while e.has_work():
        for out in e.step():
            tokens[out.req_id] += out.new_token_ids
            finish[out.req_id] = out.finish_reason
        if e.last_result is not None and e.last_result.ring.bsz:
            rings.append(e.last_result.ring)
    return [tokens[i] for i in ids], [finish[i] for i in ids], rings


@pytest.fixture(scope="module")
def plain_outputs():
    return run(engine("off"), greedy())[0]


def test_ngram_proposals_follow_the_most_recent_longest_match():
    assert propose_ngram([1, 2, 3, 9, 1, 2, 3, 7, 5, 1, 2, 3], k=2, ngram_max=3, ngram_min=1) == [7, 5]
    # no 3- or 2-gram recurs: the last token alone matches
    assert propose_ngram([4, 8, 6, 1, 4], k=3, ngram_max=3, ngram_min=1) == [8, 6, 1]
    assert propose_ngram([4, 8, 6, 1, 4], k=3, ngram_max=3, ngram_min=2) == []
    assert propose_ngram([1, 2, 3], k=3, ngram_max=3, ngram_min=1) == []  # the suffix never matches itself
    assert propose_ngram([7, 7], k=3, ngram_max=3, ngram_min=1) == [7]  # what exists, not k


def test_ngram_proposals_equal_a_brute_force_search():
    rng = random.Random(5)
    for _ in range(300):
        tokens = [rng.randrange(4) for _ in range(rng.randrange(1, 40))]
        k, lo = rng.randrange(1, 6), rng.randrange(1, 3)
        hi = rng.randrange(lo, 5)
        want: list[int] = []
        for n in range(min(hi, len(tokens) - 1), lo - 1, -1):
            starts = [s for s in range(len(tokens) - n) if tokens[s: s + n] == tokens[len(tokens) - n:]]
            if starts:
                want = tokens[starts[-1] + n: starts[-1] + n + k]
                break
        assert propose_ngram(tokens, k, hi, lo) == want, (tokens, k, hi, lo)


def test_a_token_history_proposes_what_the_token_lists_propose():
    """The planner's per-request array, grown by outputs a few at a time (past
    its first size and the search window), with assumed tokens after them."""
    rng = random.Random(7)
    prompt = [rng.randrange(6) for _ in range(50)]
    outputs: list[int] = []
    history = TokenHistory(prompt)
    while len(outputs) < SEARCH_WINDOW + 300:
        outputs.extend(rng.randrange(6) for _ in range(rng.randrange(0, 6)))
        assumed = [rng.randrange(6) for _ in range(rng.randrange(0, 5))]
        known = history.tokens(outputs, assumed)
        assert known.tolist()[-200:] == (prompt + outputs + assumed)[-200:] and len(known) == len(prompt + outputs + assumed)
        assert propose_ngram(known, 4, 3, 1) == propose_ngram(prompt + outputs + assumed, 4, 3, 1)
    assert history.tokens(outputs).tolist() == prompt + outputs  # assumed tokens were never kept


@pytest.mark.parametrize("overlap", [False, True], ids=["sync", "overlap"])
def test_steps_with_more_requests_than_max_batch_draft_nothing(overlap):
    """speculative_max_batch = 2: while three or four requests run, steps decode
    plainly; once the short ones end, the other two speculate. Same tokens."""
    params = [greedy(16), greedy(24), greedy(48), greedy(48)]
    plain = run(engine("off"), params)[0]
    e = engine(overlap=overlap, speculative_max_batch=2)
    outputs, _, rings = run(e, params)
    assert outputs == plain
    stats = e.spec.stats.snapshot()
    assert stats["spec_paused_steps"] > 0 and stats["spec_verify_rows"] > 0, stats
    verified = [r for r in rings if r.flag == FLAG_SPECULATIVE]
    assert verified and all(r.bsz <= 2 for r in verified)  # drafts only while two requests ran
    assert any(r.bsz > 2 for r in rings)


@pytest.mark.parametrize("overlap", [False, True], ids=["sync", "overlap"])
def test_a_pause_that_starts_behind_verify_rows_in_flight_keeps_the_tokens(overlap):
    """Two requests speculate, then two more arrive: the steps after pause with
    verify rows (and their misses) still in flight, and the rows chained on them
    carry no drafts. Every request still gets plain decoding's tokens."""
    def staged(e: LLMEngine) -> list[list[int]]:
        ids = [e.add_request(p, greedy(40)) for p in PROMPTS[:2]]
        tokens: dict[int, list[int]] = {}
        for step in range(200):
            if step == 6:
                ids += [e.add_request(p, greedy(40)) for p in PROMPTS[2:]]
            if not e.has_work():
                break
            for out in e.step():
                tokens.setdefault(out.req_id, []).extend(out.new_token_ids)
        return [tokens[i] for i in ids]

    plain = staged(engine("off", overlap=overlap))
    e = engine(overlap=overlap, speculative_max_batch=2)
    assert staged(e) == plain
    stats = e.spec.stats.snapshot()
    assert stats["spec_verify_rows"] > 0 and stats["spec_paused_steps"] > 0, stats
    assert e.scheduler.block_manager.num_used_blocks == 0


def test_max_batch_is_checked():
    with pytest.raises(ValueError, match="speculative_max_batch"):
        EngineConfig(model="tiny", speculative="ngram", speculative_max_batch=-1)


@pytest.mark.parametrize("overlap", [False, True], ids=["sync", "overlap"])
def test_speculative_greedy_equals_plain_greedy(overlap, plain_outputs):
    e = engine(overlap=overlap)
    outputs, finish, rings = run(e, greedy())
    assert outputs == plain_outputs
    assert all(f == FinishReason.LENGTH for f in finish)
    stats = e.spec.stats.snapshot()
    assert stats["spec_accepted"] > 0 and stats["spec_tokens_per_step"] > 1.0, stats
    assert stats["spec_acceptance_rate"] == stats["spec_accepted"] / stats["spec_proposed"]
    if overlap:  # rows planned while the row before was in flight; some followed a miss and moved back
        assert stats["spec_chained_rows"] > 0 and 0 < stats["spec_lagged_rows"] < stats["spec_chained_rows"], stats
    else:  # nothing is in flight when sync mode plans
        assert stats["spec_chained_rows"] == stats["spec_lagged_rows"] == 0, stats
    # fewer steps than tokens: verify rows emitted several tokens at once
    assert e.scheduler.last_step_id < sum(map(len, outputs))
    spec_rings = [r for r in rings if r.flag == FLAG_SPECULATIVE]
    assert spec_rings and max(int(r.accept_num.max()) for r in spec_rings) > 1
    for r in spec_rings:
        assert r.tokens.shape[1] == K + 1
        body = unpack_step(pack_step(**r.columns()))  # the SPEC 1.3 codec carries them as they are
        assert (body.flag, body.T) == (FLAG_SPECULATIVE, K + 1)
        assert body.accept_num.tolist() == r.accept_num.tolist()
    # per request, the ring's tokens in order are the request's output
    by_request: dict[int, list[int]] = {}
    for r in rings:
        for i, rid in enumerate(r.request_id.tolist()):
            by_request.setdefault(rid, []).extend(r.tokens[i, : r.accept_num[i], 0].tolist())
    assert list(by_request.values()) == outputs
    bm = e.scheduler.block_manager
    bm.check()
    assert bm.num_available_blocks == bm.num_blocks  # nothing held (cached prefixes stay evictable)


def test_stops_apply_inside_a_verify_rows_tokens(plain_outputs):
    # a stop id and max_tokens that land in the middle of what verify rows emit
    out = plain_outputs[1]
    stop_id = next(t for i, t in enumerate(out) if i >= 6 and t not in out[:i])
    params = [greedy(max_tokens=13), greedy(stop_token_ids=(stop_id,)), greedy(max_tokens=7), greedy(max_tokens=1)]
    for overlap in (False, True):
        got, finish, _ = run(engine(overlap=overlap), params)
        want, want_finish, _ = run(engine("off", overlap=overlap), params)
        assert got == want and finish == want_finish
        assert len(got[0]) == 13 and finish[0] == FinishReason.LENGTH
        assert got[1][-1] == stop_id and stop_id not in got[1][:-1] and finish[1] == FinishReason.STOP
        assert len(got[2]) == 7 and len(got[3]) == 1


def logprobs_of(e: LLMEngine, params: list[SamplingParams], prompts: list[list[int]] = PROMPTS):
    """(tokens, per request the (token, logprob, rank, top ids) of each output, ring rows)."""
    ids = [e.add_request(p, params[i]) for i, p in enumerate(prompts)]
    tokens: dict[int, list[int]] = {i: [] for i in ids}
    lps: dict[int, list[tuple[int, float, int, list[int]]]] = {i: [] for i in ids}
    rings = []
    while e.has_work():
        for out in e.step():
            tokens[out.req_id] += out.new_token_ids
            for lp in out.logprobs or ():
                lps[out.req_id].append((lp.token_id, lp.logprob, lp.rank, [t for t, _ in lp.top]))
        if e.last_result is not None and e.last_result.ring.bsz:
            rings.append(e.last_result.ring)
    return [tokens[i] for i in ids], [lps[i] for i in ids], rings


def test_sampled_and_logprob_rows_speculate_and_give_the_plain_tokens(plain_outputs):
    # seeded sampled rows (cool enough to follow the repeats, so drafts hit), logprob rows, an opted-out row
    params = [greedy(), SamplingParams(max_tokens=40, temperature=0.3, top_p=0.9, seed=7, ignore_eos=True),
              greedy(logprobs=2), SamplingParams(max_tokens=40, temperature=0.25, seed=3, logprobs=3, ignore_eos=True),
              greedy(speculative=False)]
    prompts = PROMPTS + [PROMPTS[0]]
    want, want_lps, _ = logprobs_of(engine("off"), params, prompts)
    for overlap in (False, True):
        e = engine(overlap=overlap)
        got, got_lps, rings = logprobs_of(e, params, prompts)
        # each token is what the plain run drew with the same seed state (spec/verify.py)
        assert got == want
        assert got[0] == plain_outputs[0]
        for g, w in zip(got_lps, want_lps):
            assert [x[0] for x in g] == [x[0] for x in w] and [x[2] for x in g] == [x[2] for x in w]
            assert [x[3] for x in g] == [x[3] for x in w]
            assert np.allclose([x[1] for x in g], [x[1] for x in w], atol=1e-4)
        # a seeded request alone gives what it gave in the crowd
        alone, _, _ = logprobs_of(engine(overlap=overlap), [params[1]], [prompts[1]])
        assert alone[0] == got[1]
        # every request but the opted-out one took verify rows that accepted drafts
        accepted = {rid for r in rings for i, rid in enumerate(r.request_id.tolist()) if r.accept_num[i] > 1}
        assert accepted == {1, 2, 3, 4}, accepted
        # the ring carries each emitted token's logprobs at the actual k, zeros past accept_num
        cells = 0
        for r in rings:
            if r.flag != FLAG_SPECULATIVE or r.k == 0:
                continue
            body = unpack_step(pack_step(**r.columns()))
            assert (body.T, body.k) == (K + 1, r.k)
            for i, rid in enumerate(body.request_id.tolist()):
                n = int(body.accept_num[i])
                assert (body.logprobs[i, n:] == 0).all() and (body.ranks[i, n:] == 0).all()
                assert (body.tokens[i, n:] == 0).all()
                if rid in (3, 4) and n > 1:
                    assert np.isfinite(body.logprobs[i, :n]).all() and (body.logprobs[i, :n] <= 0).all()
                    assert (body.ranks[i, :n] >= 1).all()
                    assert (body.tokens[i, :n, 1] == body.tokens[i, :n, 0]).all() if rid == 3 else True
                    cells += 1
        assert cells, "no logprob request's verify row accepted drafts"


def test_speculative_false_gives_plain_steps(plain_outputs):
    e = engine()
    outputs, _, rings = run(e, greedy(speculative=False))
    assert outputs == plain_outputs
    assert e.spec.stats.verify_rows == 0
    assert all(r.flag == FLAG_NORMAL and r.tokens.shape[1] == 1 for r in rings)


@pytest.mark.parametrize("overlap", [False, True], ids=["sync", "overlap"])
def test_preemption_in_the_middle_of_speculation(overlap):
    # 16 blocks of 16 positions (one full-length request): the four requests
    # (84, 196, 70 and 56 positions) cannot all hold their KV at once
    prompts = [p * 2 for p in PROMPTS]
    params = greedy(max_tokens=40)
    want, _, _ = run(engine("off", max_model_len=256), params, prompts)
    e = engine(overlap=overlap, num_blocks=16, max_model_len=256)
    got, finish, _ = run(e, params, prompts)
    assert e.scheduler.num_preemptions > 0, "the small pool never preempted: the test proves nothing"
    assert e.spec.stats.accepted > 0
    assert got == want
    bm = e.scheduler.block_manager
    bm.check()
    assert bm.num_available_blocks == bm.num_blocks == 16  # nothing held


def test_rejected_drafts_give_back_their_blocks():
    # block_size 4: a verify row of 1 + 4 positions spans a new block that
    # rejected drafts alone would hold
    e = engine(block_size=4, num_blocks=256, max_model_len=256)
    rid = e.add_request(list(range(3, 30)) + [3, 4], greedy(max_tokens=60))
    req = e.scheduler.get_request(rid)
    seen_rejections = run_checking_verify_blocks(e, req, 4) > 0
    assert seen_rejections
    assert e.scheduler.block_manager.num_available_blocks == 256  # nothing held


def test_default_model_speculative_greedy_equals_plain():
    """Real weights: a chat request to repeat a paragraph, the same engine with
    speculation on and off per request (the output copies the prompt, so drafts hit)."""
    e = LLMEngine(EngineConfig(model=DEFAULT_MODEL, speculative="ngram", num_speculative_tokens=3, max_model_len=512),
                  overlap=True)
    text = ("Repeat this paragraph twice, word for word: The old lighthouse keeper climbed the spiral stairs "
            "every evening, lit the great lamp, and watched the ships pass safely through the narrow channel below.")
    prompt = e.loaded.chat_template.render([{"role": "user", "content": text}])
    plain = e.generate([prompt], SamplingParams(max_tokens=48, temperature=0.0, speculative=False))[0]
    assert e.spec.stats.verify_rows == 0
    spec = e.generate([prompt], SamplingParams(max_tokens=48, temperature=0.0))[0]
    assert spec.token_ids == plain.token_ids and spec.text == plain.text
    assert "lighthouse keeper" in spec.text
    stats = e.spec.stats.snapshot()
    assert stats["spec_tokens_per_step"] > 1.5, stats
    assert e.scheduler.block_manager.num_available_blocks == e.num_blocks  # nothing held
