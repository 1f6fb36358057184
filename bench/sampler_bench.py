"""The sampler's device time at one batch, piece by piece, for bench/gpu.py.

Each piece is captured in a CUDA graph and its replays are timed with CUDA
events (median of `reps`), on random bf16-valued logits over the 128k
vocabulary, with issue 13's parameters (temperature 0.8, top-p 0.95, seeds):
greedy argmax, the sampled path through the sort-free kernels
(kernels/triton_sampling.py, the default on a GPU: each launch, and the round
that decided each row), and through the ops with its sort keys in bf16 (the
runner's choice for a bf16 model) and in float32, the logprob pack at width
20 through the ops and through kernels/triton_logprobs.py, and the vocabulary
sort alone in each dtype.
"""

from __future__ import annotations

import statistics
from typing import Callable

import numpy as np
import torch
from overlapd.stages.runtime import load_runtime
from overlapd.stages.sampling.sampler import Sampler, SamplingTensors, seed_state


def _time_graph(fn: Callable[[], object], reps: int = 50) -> float:
    """Median device time of one replay of fn's graph, in microseconds."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        g.replay()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) * 1e3)
    return statistics.median(times)


def sampler_bench(rows: int = 64, vocab: int = 128256) -> dict:
    ops = load_runtime("torch", "gpu")
    gen = torch.Generator(device="cuda")
    gen.manual_seed(0)
    logits = (3 * torch.randn(rows, vocab, generator=gen, device="cuda")).to(torch.bfloat16).float()
    params = SamplingTensors(
        temperature=torch.full((rows,), 0.8, device="cuda"), top_p=torch.full((rows,), 0.95, device="cuda"),
        top_k=torch.zeros(rows, dtype=torch.int64, device="cuda"),
        seed_state=torch.tensor([seed_state(1000 + i, 0) for i in range(rows)], dtype=torch.int64, device="cuda"))
    plain = load_runtime("torch", "gpu")
    plain.fused_sample = plain.fused_logprobs = None  # the ops path: sort, then masks and cumsums
    bf16, f32 = Sampler(plain, vocab, sort_dtype="bfloat16"), Sampler(plain, vocab)
    fused = Sampler(ops, vocab, sort_dtype="bfloat16")  # what the runner uses for a bf16 model
    finish = torch.zeros(rows, dtype=torch.int64, device="cuda")
    a = bf16.sample(logits, params, any_random=True)
    b = f32.sample(logits, params, any_random=True)
    c = fused.sample(logits, params, any_random=True)
    sampled = a
    out = {
        "rows": rows, "vocab": vocab, "fused_kernel": ops.fused_sample is not None,
        "bf16_sort_same_tokens": bool(torch.equal(a, b)),
        "greedy_argmax_us": _time_graph(lambda: fused.sample(logits, params, any_random=False)),
        "sample_fused_us": _time_graph(lambda: fused.sample(logits, params, any_random=True)),
        "sample_bf16_sort_us": _time_graph(lambda: bf16.sample(logits, params, any_random=True)),
        "sample_f32_sort_us": _time_graph(lambda: f32.sample(logits, params, any_random=True)),
        "pack_logprobs20_us": _time_graph(lambda: bf16.pack(logits, sampled, finish, 20)),  # the ops path
        "pack_none_us": _time_graph(lambda: bf16.pack(logits, sampled, finish, 0)),
        "sort_f32_us": _time_graph(lambda: torch.sort(logits, dim=-1, descending=True, stable=True)),
        "sort_bf16_us": _time_graph(lambda: torch.sort(logits.to(torch.bfloat16), dim=-1, descending=True,
                                                       stable=True)),
    }
    # where the sort-free sampler's time goes: the first n of its launches, timed
    from overlapd.kernels import triton_sampling as ts

    t, tp, tk = params.temperature, params.top_p, params.top_k
    upto = [_time_graph(lambda n=n: ts.sample(logits, t, tp, tk, params.seed_state, 16, launches=n))
            for n in range(1, len(ts.LAUNCHES) + 1)]
    out["fused_launch_us"] = dict(zip(ts.LAUNCHES, np.diff([0.0, *upto]).tolist()))
    rounds = torch.empty(rows, dtype=torch.int32, device="cuda")
    ts.sample(logits, t, tp, tk, params.seed_state, 16, rounds=rounds)
    out["fused_deciding_rounds"] = {int(k): int(v) for k, v in zip(*np.unique(rounds.cpu().numpy(),
                                                                            return_counts=True))}
    # and the logprob pack's pieces: the ops path's, then kernels/triton_logprobs.py's two launches
    lp = torch.log_softmax(logits, dim=-1)
    out["log_softmax_us"] = _time_graph(lambda: torch.log_softmax(logits, dim=-1))
    out["topk20_f32_us"] = _time_graph(lambda: torch.topk(lp, 20, dim=-1))
    out["topk20_bf16_us"] = _time_graph(lambda: torch.topk(logits.to(torch.bfloat16), 20, dim=-1))
    out["pack_logprobs20_fused_us"] = _time_graph(lambda: fused.pack(logits, sampled, finish, 20))
    # the distribution check a reader can redo: sampled ids lie in each row's top-p set
    probs = torch.softmax(logits / 0.8, dim=-1)
    sp, si = torch.sort(probs, dim=-1, descending=True, stable=True)
    before = torch.cumsum(sp, dim=-1) - sp
    kept = torch.zeros_like(probs, dtype=torch.bool).scatter_(1, si, before < 0.95)
    out["sampled_in_top_p_set"] = bool(kept.gather(1, a.view(-1, 1)).all())
    out["fused_in_top_p_set"] = bool(kept.gather(1, c.view(-1, 1)).all())
    out["distinct_tokens"] = int(np.unique(c.cpu().numpy()).size)
    return out
