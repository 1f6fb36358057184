"""Sampled and logprob decode steps inside the captured CUDA graphs (issue 13):
a batch mixing greedy, seeded (temperature, top-p, top-k) and logprob rows
replays one graph per bucket and gives exactly the eager tokens, overlapped
and in sync; the bf16 sort keys give the float32 sort's tokens; the dummy 8B
shape's dummy weights are drawn on the device."""

from __future__ import annotations

import os
import sys
import tempfile
import time

import numpy as np
import pytest
from gpu_support import requires_gpu

pytestmark = requires_gpu
sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))  # tests/, for graph_replay_check

_KEEP: list[object] = []  # graphs share one pool per ops; keep them alive (see test_gpu_step_kernels)


@pytest.fixture(scope="module")
def ops(torch):
    from overlapd.stages.runtime.torch_ops import TorchOps

    return TorchOps("gpu")


def _run(ops, loaded, graphs: bool, overlapped: bool):
    from engine_test_support import Driver, Req, engine_config
    from graph_replay_check import MIXED, PROMPTS
    from overlapd.stages.runner.model_runner import ModelRunner

    runner = ModelRunner(loaded, ops, engine_config(runtime="torch", device="gpu", block_size=4), 128)
    _KEEP.append(runner)
    if not graphs:
        runner.graphs = None
    d = Driver(runner, token_budget=16)
    reqs = [d.add(Req(i + 1, PROMPTS[i % len(PROMPTS)], p, seed=1000 + i)) for i, p in enumerate(MIXED)]
    d.run_overlapped() if overlapped else d.run()
    lps = [[(lp.tolist(), ids.tolist(), rank) for lp, ids, rank in r.logprob_rows] for r in reqs]
    return [r.outputs for r in reqs], lps, runner.graphs


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_mixed_batch_replays_one_sampled_graph_and_gives_the_eager_tokens(torch, ops, dtype) -> None:
    from engine_test_support import engine_config
    from graph_replay_check import same_logprobs
    from overlapd.stages.model.loader import load_model

    loaded = load_model(engine_config(runtime="torch", device="gpu", dtype=dtype), ops)
    eager, eager_lp, _ = _run(ops, loaded, False, True)
    eager_sync, eager_sync_lp, _ = _run(ops, loaded, False, False)
    ovl, ovl_lp, g = _run(ops, loaded, True, True)
    sync, sync_lp, gs = _run(ops, loaded, True, False)
    assert eager == eager_sync and eager_lp == eager_sync_lp  # unpadded: bit-exact
    assert ovl == eager and sync == eager
    # logprob values within float rounding (a replay attends over the padded context bucket)
    tol = 1e-5 if dtype == "float32" else 2e-2
    assert same_logprobs(ovl_lp, eager_lp, tol) and same_logprobs(sync_lp, eager_lp, tol)
    assert {k[2:] for k in g._graphs} == {(True, 20, False)} and g.replays > 20 and gs.replays > 20
    assert len({tuple(t) for t in ovl}) == 5


def test_bf16_sort_keys_give_the_float32_sorts_tokens(torch, ops) -> None:
    """bf16-valued logits have many exact ties; the stable order, and so every
    sampled token, is the same whichever dtype the keys are sorted in."""
    from overlapd.stages.sampling.sampler import Sampler, SamplingTensors, seed_state

    rows, vocab = 64, 128256
    gen = torch.Generator(device="cuda")
    gen.manual_seed(3)
    logits = (3 * torch.randn(rows, vocab, generator=gen, device="cuda")).to(torch.bfloat16).float()
    rng = np.random.default_rng(0)
    p = SamplingTensors(
        temperature=torch.tensor(rng.choice([0.0, 0.5, 0.8, 1.3], rows), dtype=torch.float32, device="cuda"),
        top_p=torch.tensor(rng.choice([1.0, 0.95, 0.5, 0.01], rows), dtype=torch.float32, device="cuda"),
        top_k=torch.tensor(rng.choice([0, 1, 40, 1000], rows), dtype=torch.int64, device="cuda"),
        seed_state=torch.tensor([seed_state(i, 0) for i in range(rows)], dtype=torch.int64, device="cuda"))
    from overlapd.stages.runtime.torch_ops import TorchOps

    plain = TorchOps("gpu")
    plain.fused_sample = None  # the ops path, which sorts
    a = Sampler(plain, vocab, sort_dtype="bfloat16").sample(logits, p, any_random=True)
    b = Sampler(plain, vocab).sample(logits, p, any_random=True)
    assert torch.equal(a, b)
    assert len(set(a.tolist())) > rows // 2
    # the sort-free kernels: the same token with 16-bit and 32-bit keys on bf16 values
    c = Sampler(ops, vocab, sort_dtype="bfloat16").sample(logits, p, any_random=True)
    d = Sampler(ops, vocab).sample(logits, p, any_random=True)
    assert ops.fused_sample is not None and torch.equal(c, d)


def test_sort_free_sampler_draws_the_kept_distribution(torch, ops) -> None:
    """20,000 seeds on one row (temperature 0.7, top-p 0.8, top-k 30): every draw
    lies in the kept set, and the frequencies follow the renormalized kept
    probabilities (chi-square over the kept tokens, far below what a wrong
    distribution gives). Then the 128k vocabulary, batch 1 and 64, against the
    float64 reference on the same seeds (rows float32 rounding could move aside)."""
    from overlapd.kernels import triton_sampling as ts

    n, vocab = 20000, 4096
    g = torch.Generator(device="cuda")
    g.manual_seed(11)
    row = (2 * torch.randn(vocab, generator=g, device="cuda")).to(torch.bfloat16).float()
    logits = row.expand(n, vocab).contiguous()
    full = lambda v: torch.full((n,), v, device="cuda")  # noqa: E731
    state = torch.randint(0, 1 << 31, (n,), generator=g, device="cuda")
    got = ts.sample(logits, full(0.7), full(0.8), full(30).long(), state, key_bits=16)
    from sampling_reference import draw_reference, kept_mask  # the definition in numpy

    p = torch.softmax(row.double() / 0.7, dim=0)
    kept = torch.from_numpy(kept_mask(row.cpu().numpy(), 0.7, 0.8, 30, 16)).cuda()
    assert bool(kept[got].all()) and 2 <= int(kept.sum()) <= 30
    q = p * kept
    q = q / q.sum()
    counts = torch.bincount(got, minlength=vocab).double()
    idx = kept.nonzero().squeeze(1)
    chi2 = float(((counts[idx] - n * q[idx]) ** 2 / (n * q[idx])).sum())
    assert chi2 < 3 * len(idx) + 30, (chi2, len(idx))

    for rows in (1, 64):
        big = (3 * torch.randn(rows, 128256, generator=g, device="cuda")).to(torch.bfloat16).float()
        t, tp = full(0.8)[:rows], full(0.95)[:rows]
        tk, st = torch.zeros(rows, dtype=torch.int64, device="cuda"), state[:rows]
        want, _, amb = draw_reference(big.cpu().numpy(), t.cpu().numpy(), tp.cpu().numpy(), tk.cpu().numpy(),
                                      st.cpu().numpy(), 16)
        got = ts.sample(big, t, tp, tk, st, key_bits=16).cpu().numpy()
        assert (got == want)[~amb].all() and amb.sum() <= rows // 8, (rows, (got != want).sum(), amb.sum())


def test_logprob_kernels_give_the_ops_pack_on_the_128k_vocabulary(torch, ops) -> None:
    """kernels/triton_logprobs.py against the ops path (log_softmax, topk) on bf16-valued
    logits, batch 64, width 20: the same ranks and stop codes, the same top values
    (ties are common in bf16, and topk may pick other members of a tie: the values
    of the ids are compared), ids in vocabulary order within a tie."""
    from overlapd.kernels.triton_logprobs import pack
    from overlapd.stages.runtime.torch_ops import TorchOps
    from overlapd.stages.sampling.sampler import Sampler

    g = torch.Generator(device="cuda")
    g.manual_seed(3)
    rows, vocab = 64, 128256
    logits = (3 * torch.randn(rows, vocab, generator=g, device="cuda")).to(torch.bfloat16).float()
    sampled = torch.randint(0, vocab, (rows,), generator=g, device="cuda")
    finish = torch.arange(rows, device="cuda")
    plain = TorchOps("gpu")
    plain.fused_logprobs = None
    want = Sampler(plain, vocab).pack(logits, sampled, finish, 20)
    ints, lps = pack(logits, sampled, finish, 20)
    assert torch.equal(ints[:, :3], want.ints[:, :3])
    assert float((lps - want.logprobs).abs().max()) < 1e-5
    ids, want_ids = ints[:, 3:], want.ints[:, 3:]
    assert torch.equal(logits.gather(1, ids), logits.gather(1, want_ids))
    vals = logits.gather(1, ids)
    tied = vals[:, 1:] == vals[:, :-1]
    assert bool((ids[:, 1:] > ids[:, :-1])[tied].all()) and int(tied.sum()) > 0


def test_the_8b_shape_is_drawn_on_the_device_with_its_real_shape(torch, ops) -> None:
    from overlapd.stages.engine.config import EngineConfig
    from overlapd.stages.model.loader import load_model

    cfg = EngineConfig(model="llama-3.1-8b", load_format="dummy", runtime="torch", device="gpu", dtype="bfloat16",
                       max_model_len=4096)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    loaded = load_model(cfg, ops)
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    c = loaded.config
    assert (c.num_hidden_layers, c.hidden_size, c.intermediate_size, c.num_key_value_heads, c.vocab_size) == \
        (32, 4096, 14336, 8, 128256)
    n = sum(t.numel() for t in loaded.model.params.values())
    assert n == c.num_parameters() and 8.0e9 < n < 8.1e9
    w = loaded.model.params["layers.31.gate_up_proj"]
    assert w.dtype == torch.bfloat16 and abs(float(w.float().std()) * 64 - 1) < 0.01  # std 1/sqrt(4096)
    print(f"llama-3.1-8b dummy load: {elapsed:.2f} s (bench/gpu.py records the load times)")
    del loaded
    torch.cuda.empty_cache()
