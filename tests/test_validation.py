"""Admission checks: every bad field is named, with numbers a person can act on."""

from __future__ import annotations

import math

import pytest
from overlapd.stages.engine.config import EngineConfig
from overlapd.stages.request import InvalidRequest, validate_request
from overlapd.stages.scheduling import Scheduler, SchedulerFull
from overlapd.stages.step_types import SamplingParams

VOCAB = 100
CTX = 32


def bad(prompt: list[int], **params) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as e:
        validate_request(prompt, SamplingParams(**params), VOCAB, CTX)
    return e.value


@pytest.mark.parametrize(
    ("prompt", "params", "field", "words"),
    [
        ([], {}, "prompt", "empty"),
        ([1, 100], {}, "prompt_ids", "100"),
        ([1, -1], {}, "prompt_ids", "-1"),
        ([1] * CTX, {}, "prompt", f"{CTX} tokens but the context is {CTX}"),
        ([1] * 40, {}, "prompt", "40 tokens"),
        ([1] * 20, {"max_tokens": 13}, "max_tokens", "max_tokens <= 12"),
        ([1], {"max_tokens": 0}, "max_tokens", "at least 1"),
        ([1], {"max_tokens": -3}, "max_tokens", "-3"),
        ([1], {"temperature": -0.1}, "temperature", ">= 0"),
        ([1], {"temperature": math.nan}, "temperature", "finite"),
        ([1], {"temperature": math.inf}, "temperature", "finite"),
        ([1], {"top_p": 0.0}, "top_p", "(0, 1]"),
        ([1], {"top_p": 1.5}, "top_p", "(0, 1]"),
        ([1], {"top_p": math.nan}, "top_p", "(0, 1]"),
        ([1], {"top_k": -1}, "top_k", "0..2**63-1"),
        ([1], {"top_k": 2**63}, "top_k", "0..2**63-1"),
        ([1], {"logprobs": 21}, "logprobs", "0..20"),
        ([1], {"logprobs": -1}, "logprobs", "0..20"),
        ([1], {"stop": ("ok", "")}, "stop", "index 1"),
        ([1], {"stop_token_ids": (5, 100)}, "stop_token_ids", "100"),
        ([1], {"seed": -1}, "seed", "2**64"),
        ([1], {"seed": 1 << 64}, "seed", "2**64"),
    ],
)
def test_bad_field_is_named(prompt, params, field, words) -> None:
    err = bad(prompt, **params)
    assert err.field == field
    assert words in err.message
    assert str(err).startswith(f"{field}: ")


def test_good_requests_pass() -> None:
    validate_request([1] * 20, SamplingParams(max_tokens=12), VOCAB, CTX)  # exactly fills the context
    validate_request(
        [0, 99],
        SamplingParams(
            temperature=0, top_p=1.0, top_k=5, logprobs=20, seed=(1 << 64) - 1, stop=("\n",), stop_token_ids=(99,)
        ),
        VOCAB,
        CTX,
    )


def test_scheduler_rejects_what_can_never_fit_the_cache_and_bounds_waiting() -> None:
    cfg = EngineConfig(block_size=4, max_num_seqs=2, max_num_batched_tokens=8)
    sched = Scheduler(cfg, num_blocks=3, max_model_len=CTX, vocab_size=VOCAB, max_waiting=2)
    with pytest.raises(InvalidRequest) as e:
        sched.add_request(1, [1] * 13, SamplingParams(max_tokens=1))
    assert e.value.field == "prompt"
    with pytest.raises(InvalidRequest) as e:
        sched.add_request(1, [1] * 10, SamplingParams(max_tokens=4))
    assert e.value.field == "max_tokens" and "max_tokens <= 3" in e.value.message
    sched.add_request(1, [1] * 10, SamplingParams(max_tokens=3))
    with pytest.raises(InvalidRequest) as e:
        sched.add_request(1, [1], SamplingParams())
    assert e.value.field == "request_id"
    sched.add_request(2, [1], SamplingParams(max_tokens=2))
    with pytest.raises(SchedulerFull):
        sched.add_request(3, [1], SamplingParams(max_tokens=2))


def test_scheduler_config_checks() -> None:
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        Scheduler(
            EngineConfig(max_num_seqs=8, max_num_batched_tokens=4), num_blocks=4, max_model_len=CTX, vocab_size=VOCAB
        )
    with pytest.raises(ValueError, match="chunked prefill"):
        Scheduler(
            EngineConfig(max_num_seqs=4, max_num_batched_tokens=16, enable_chunked_prefill=False),
            num_blocks=4,
            max_model_len=CTX,
            vocab_size=VOCAB,
        )
