"""Scheduler + detokenizer + ring rows, driven by the stand-in device and a real BPE."""

from __future__ import annotations

import numpy as np
import pytest
from overlapd.kernels.meta import pack_step, unpack_step
from overlapd.stages.engine.config import EngineConfig
from overlapd.stages.output.processor import OutputProcessor, RequestOutput
from overlapd.stages.scheduling import Scheduler
from overlapd.stages.step_types import FinishReason, SamplingParams, SchedulerOutput, StepOutput
from scheduler_sim import SimDevice, reference_tokens
from tiny_bpe import EOS_TOKEN, tiny_bpe

TOK = tiny_bpe()
VOCAB = TOK.get_vocab_size()
EOS = TOK.token_to_id(EOS_TOKEN)


def make(eos: tuple[int, ...] = (EOS,), num_blocks: int = 64, budget: int = 64) -> tuple[OutputProcessor, SimDevice]:
    cfg = EngineConfig(block_size=4, max_num_seqs=8, max_num_batched_tokens=budget)
    sched = Scheduler(cfg, num_blocks=num_blocks, max_model_len=512, vocab_size=VOCAB, eos_token_ids=eos)
    return OutputProcessor(sched, TOK), SimDevice(num_blocks, 4, VOCAB)


def with_logprobs(out: StepOutput, k: int, seed: int = 0) -> StepOutput:
    rng = np.random.default_rng(seed + out.step_id)
    n = len(out.sampled)
    return StepOutput(
        step_id=out.step_id,
        req_ids=out.req_ids,
        sampled=out.sampled,
        k=k,
        logprobs=-rng.random((n, k + 1), dtype=np.float32),
        top_ids=rng.integers(0, VOCAB, (n, k), dtype=np.int32),
        ranks=rng.integers(1, 5, n, dtype=np.int32),
    )


def run(proc: OutputProcessor, dev: SimDevice, overlap: bool, k: int = 0):
    """Yields (so, out, outputs, ring) per step, sync or with one step in flight."""
    sched = proc.scheduler
    in_flight: tuple[SchedulerOutput, StepOutput] | None = None
    while sched.has_work() or in_flight is not None:
        so = sched.schedule()
        launched = None
        if not so.is_empty:
            out = dev.run(so)
            launched = (so, with_logprobs(out, k) if k else out)
        if not overlap and launched is not None:
            in_flight, launched = launched, None
        if in_flight is not None:
            outputs, ring = proc.process(*in_flight)
            yield in_flight[0], in_flight[1], outputs, ring
        in_flight = launched


def collect(results) -> dict[int, list[RequestOutput]]:
    by_req: dict[int, list[RequestOutput]] = {}
    for _, _, outputs, _ in results:
        for o in outputs:
            by_req.setdefault(o.req_id, []).append(o)
    return by_req


def prompt(text: str) -> list[int]:
    return TOK.encode(text).ids


@pytest.mark.parametrize("overlap", [False, True])
def test_text_matches_decoding_the_tokens_and_eos_adds_no_text(overlap: bool) -> None:
    proc, dev = make(eos=())
    p = prompt("héllo wörld")
    params = SamplingParams(max_tokens=20, seed=3)
    req = proc.scheduler.add_request(1, p, params)
    want, _ = reference_tokens(p, params, req.seed, VOCAB, set())
    eos_at = 9
    proc.scheduler.eos_token_ids = frozenset({want[eos_at]}) - set(want[:eos_at])
    outs = collect(run(proc, dev, overlap))[1]
    tokens = [t for o in outs for t in o.new_token_ids]
    assert tokens == want[: eos_at + 1]
    assert outs[-1].finish_reason is FinishReason.EOS and all(o.finish_reason is None for o in outs[:-1])
    assert "".join(o.text_delta for o in outs) == TOK.decode(want[:eos_at])
    assert [o.completion_tokens for o in outs] == list(range(1, eos_at + 2))
    assert outs[-1].prompt_tokens == len(p)


@pytest.mark.parametrize("overlap", [False, True])
def test_stop_string_finishes_frees_blocks_and_truncates(overlap: bool) -> None:
    proc, dev = make(eos=())
    p = prompt("the quick")
    free_params = SamplingParams(max_tokens=30, seed=11)
    seed = proc.scheduler.add_request(1, p, free_params).seed
    want, _ = reference_tokens(p, free_params, seed, VOCAB, set())
    full = TOK.decode(want)
    # A stop string spanning a token boundary, from the middle of the text.
    cut = next(n for n in range(len(want) // 2, len(want)) if len(TOK.decode(want[:n])) >= 6)
    boundary = len(TOK.decode(want[:cut]))
    stop = full[boundary - 2 : boundary + 2]
    assert len(stop) == 4 and full.find(stop) >= 0
    proc2, dev2 = make(eos=())
    proc2.scheduler.add_request(1, p, SamplingParams(max_tokens=30, seed=seed, stop=(stop,)))
    results = list(run(proc2, dev2, overlap))
    outs = collect(results)[1]
    assert outs[-1].finish_reason is FinishReason.STOP
    assert "".join(o.text_delta for o in outs) == full[: full.find(stop)]
    n = len(outs)
    assert stop in TOK.decode(want[:n]) and stop not in TOK.decode(want[: n - 1])
    assert [t for o in outs for t in o.new_token_ids] == want[:n]
    assert proc2.scheduler.num_used_blocks == 0 and not proc2.scheduler.has_work()
    last_ring = [r for *_, r in results if r.bsz][-1]
    assert list(last_ring.finish) == [FinishReason.STOP]


def test_logprobs_trimmed_per_request_and_ring_rows_round_trip() -> None:
    proc, dev = make(eos=(), budget=16)  # request 1's prompt takes several chunks
    sched = proc.scheduler
    sched.add_request(
        1, prompt("hello world, hello there and more " * 3), SamplingParams(max_tokens=3, logprobs=2, seed=1)
    )
    sched.add_request(2, prompt("ok"), SamplingParams(max_tokens=2, seed=2))
    sched.add_request(3, prompt("naïve"), SamplingParams(max_tokens=1, logprobs=5, seed=3))
    results = list(run(proc, dev, overlap=True, k=5))
    for so, out, outputs, ring in results:
        emitted = {o.req_id: o for o in outputs}
        sampled_rows = [i for i, r in enumerate(so.rows) if r.sample and r.req_id in emitted]
        assert list(ring.request_id) == [so.rows[i].req_id for i in sampled_rows]
        assert ring.k == 5 and ring.tokens.shape == (len(sampled_rows), 1, 6)
        for j, i in enumerate(sampled_rows):
            o = emitted[so.rows[i].req_id]
            assert ring.tokens[j, 0, 0] == out.sampled[i] == o.new_token_ids[0]
            assert list(ring.tokens[j, 0, 1:]) == list(out.top_ids[i])
            assert np.array_equal(ring.logprobs[j, 0], out.logprobs[i]) and ring.ranks[j, 0] == out.ranks[i]
            assert ring.finish[j] == int(o.finish_reason or 0)
            asked = {1: 2, 2: 0, 3: 5}[o.req_id]
            if asked == 0:
                assert o.logprobs is None
            else:
                (lp,) = o.logprobs
                assert lp.token_id == o.new_token_ids[0] and lp.rank == out.ranks[i]
                assert lp.logprob == pytest.approx(out.logprobs[i, 0])
                assert lp.top == [
                    (int(out.top_ids[i, c]), pytest.approx(float(out.logprobs[i, c + 1]))) for c in range(asked)
                ]
        if ring.bsz:
            view = unpack_step(pack_step(**ring.columns()))
            assert view.step_id == so.step_id and view.k == 5 and view.T == 1
            assert np.array_equal(view.tokens, ring.tokens) and np.array_equal(view.finish, ring.finish)
    emitted_counts = collect(results)
    assert {r: len(v) for r, v in emitted_counts.items()} == {1: 3, 2: 2, 3: 1}


def test_ring_rows_without_logprobs_and_discarded_rows() -> None:
    proc, dev = make(eos=())
    sched = proc.scheduler
    sched.add_request(1, prompt("hello"), SamplingParams(max_tokens=4, temperature=0))
    s1 = sched.schedule()
    o1 = dev.run(s1)
    s2 = sched.schedule()
    o2 = dev.run(s2)
    assert proc.abort(2) is None
    outputs, ring = proc.process(s1, o1)
    assert ring.k == 0 and ring.logprobs is None and ring.ranks is None and ring.tokens.shape == (1, 1, 1)
    aborted = proc.abort(1)
    assert aborted is not None and aborted.finish_reason is FinishReason.ABORTED
    assert aborted.completion_tokens == 1 and aborted.prompt_tokens == len(prompt("hello"))
    assert sched.num_used_blocks == 0
    outputs, ring = proc.process(s2, o2)  # the aborted request's in-flight token is dropped
    assert outputs == [] and ring.bsz == 0
    view = unpack_step(pack_step(**ring.columns()))
    assert view.bsz == 0
