"""Sampling: seeds independent of batching, top-k/top-p support, logprobs and ranks."""

from __future__ import annotations

import numpy as np
import pytest

from engine_test_support import Driver, Req, get_ops, make_runner, tiny_cache, tiny_in_memory, tiny_loaded  # noqa: F401
from overlapd.stages.model.reference import log_softmax, reference_logits
from overlapd.stages.sampling.sampler import (
    SEED_INCREMENT, SEED_MODULUS, Sampler, SamplingTensors, seed_state, uniform_from_state,
)
from overlapd.stages.step_types import SamplingParams

PROMPT = [0, 424, 13, 314, 338, 15, 370]
SEEDED = SamplingParams(temperature=0.8, top_p=0.95, top_k=200, max_tokens=20)


def _run(loaded, reqs: list[Req], preempt_at: dict[int, int] | None = None) -> None:
    driver = Driver(make_runner(loaded))
    for r in reqs:
        driver.add(r)
    step = 0
    while not all(r.done for r in reqs):
        driver.step()
        step += 1
        for req_id, at in (preempt_at or {}).items():
            if step == at:
                driver.preempt(req_id)


def test_device_hash_matches_host_mirror_and_is_uniform() -> None:
    ops = get_ops()
    states = np.array([seed_state(s, i) for s in range(50) for i in range(40)], np.int64)
    u = ops.to_numpy(Sampler(ops, 8).uniforms(ops.from_numpy(states)))
    np.testing.assert_array_equal(u, uniform_from_state(states))
    assert (u >= 0).all() and (u < 1).all()
    hist = np.histogram(u, bins=10, range=(0, 1))[0]
    assert hist.min() > 0.8 * len(u) / 10


def test_seed_state_walks_by_the_increment_with_wraparound() -> None:
    s0 = seed_state(1234, 0)
    assert seed_state(1234, 5) == (s0 + 5 * SEED_INCREMENT) % SEED_MODULUS
    assert all(0 <= seed_state(s, i) < SEED_MODULUS for s in (0, 2**63, -1) for i in (0, 10**9))


def test_seeded_request_gives_identical_tokens_at_batch_1_and_8(tiny_loaded) -> None:
    alone = Req(1, PROMPT, SEEDED, seed=4242)
    _run(tiny_loaded, [alone])
    crowd = [Req(10 + i, [0, 7 * i + 3, 11 * i + 5][: 2 + i % 2] + PROMPT[i % 3:],
                 SamplingParams(temperature=1.0 + 0.1 * i, top_k=i * 7, top_p=1.0 - 0.05 * i,
                                max_tokens=15 + i), seed=i) for i in range(7)]
    batched = Req(1, PROMPT, SEEDED, seed=4242)
    _run(tiny_loaded, crowd[:3] + [batched] + crowd[3:])
    assert batched.outputs == alone.outputs
    assert len(set(alone.outputs)) > 3, "sampling looks degenerate"
    other = Req(1, PROMPT, SEEDED, seed=4243)
    _run(tiny_loaded, [other])
    assert other.outputs != alone.outputs


def test_seeded_request_resumes_its_stream_after_preemption(tiny_loaded) -> None:
    straight = Req(1, PROMPT, SEEDED, seed=99)
    _run(tiny_loaded, [straight, Req(2, PROMPT[:3], SEEDED, seed=5)])
    resumed = Req(1, PROMPT, SEEDED, seed=99)
    _run(tiny_loaded, [resumed, Req(2, PROMPT[:3], SEEDED, seed=5)], preempt_at={1: 6})
    assert resumed.outputs == straight.outputs


def _sample_many(logits_row: np.ndarray, params: dict, n: int = 4000) -> np.ndarray:
    """n draws from one distribution: n rows with consecutive seed states."""
    ops = get_ops()
    vocab = logits_row.shape[0]
    logits = ops.from_numpy(np.tile(logits_row.astype(np.float32), (n, 1)))
    states = np.array([seed_state(7, i) for i in range(n)], np.int64)
    t = SamplingTensors(
        ops.from_numpy(np.full(n, params.get("temperature", 1.0), np.float32)),
        ops.from_numpy(np.full(n, params.get("top_p", 1.0), np.float32)),
        ops.from_numpy(np.full(n, params.get("top_k", 0), np.int64)),
        ops.from_numpy(states),
    )
    out = Sampler(ops, vocab)(logits, t, any_random=True, num_logprobs=0)
    return ops.to_numpy(out.sampled)


def test_top_k_and_top_p_restrict_the_support() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 2, 64)
    order = np.argsort(-logits, kind="stable")
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    top5 = _sample_many(logits, {"top_k": 5})
    assert set(top5) <= set(order[:5]) and len(set(top5)) == 5
    nucleus_size = int(np.searchsorted(np.cumsum(probs[order]), 0.6) + 1)
    top_p = _sample_many(logits, {"top_p": 0.6})
    assert set(top_p) <= set(order[:nucleus_size]) and len(set(top_p)) == nucleus_size
    both = _sample_many(logits, {"top_p": 0.6, "top_k": 2})
    assert set(both) <= set(order[:2])
    full = _sample_many(logits, {})
    counts = np.bincount(full, minlength=64) / len(full)
    assert np.abs(counts - probs).max() < 0.03  # inverse-CDF sampling follows the distribution
    cold = _sample_many(logits, {"temperature": 0.05})
    assert (cold == order[0]).mean() > 0.95


def test_greedy_rows_take_the_argmax_in_a_random_batch() -> None:
    ops = get_ops()
    logits = np.random.default_rng(1).normal(size=(6, 50)).astype(np.float32)
    temps = np.array([0, 1, 0, 0.5, 0, 2], np.float32)
    t = SamplingTensors(ops.from_numpy(temps), ops.from_numpy(np.ones(6, np.float32)),
                        ops.from_numpy(np.zeros(6, np.int64)), ops.from_numpy(np.arange(6, dtype=np.int64)))
    got = ops.to_numpy(Sampler(ops, 50)(ops.from_numpy(logits), t, any_random=True, num_logprobs=0).sampled)
    greedy = temps == 0
    np.testing.assert_array_equal(got[greedy], logits.argmax(-1)[greedy])


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_logprobs_and_ranks_match_log_softmax_of_the_reference(tiny_loaded, temperature: float) -> None:
    config, weights, _ = tiny_in_memory()
    reqs = [Req(1, PROMPT, SamplingParams(temperature=temperature, max_tokens=6, logprobs=5), seed=3),
            Req(2, PROMPT[:4], SamplingParams(temperature=temperature, max_tokens=6, logprobs=20), seed=4)]
    _run(tiny_loaded, reqs)
    for r in reqs:
        ids = list(r.prompt)
        for token, (lps, top_ids, rank) in zip(r.outputs, r.logprob_rows):
            ref = log_softmax(reference_logits(config, weights, ids)[-1])
            k = 20  # the step's k is the largest any row asked for
            assert len(top_ids) == k and len(lps) == k + 1
            np.testing.assert_allclose(lps[0], ref[token], atol=1e-4)
            np.testing.assert_array_equal(top_ids[:5], np.argsort(-ref, kind="stable")[:5])
            np.testing.assert_allclose(lps[1:], ref[top_ids], atol=1e-4)
            assert rank == 1 + int((ref > ref[token] + 1e-9).sum())
            if temperature == 0:
                assert rank == 1
            ids.append(token)
