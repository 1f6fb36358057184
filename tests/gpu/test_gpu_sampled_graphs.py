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
    from overlapd.stages.model_runner import ModelRunner

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
    assert {k[2:] for k in g._graphs} == {(True, 20)} and g.replays > 20 and gs.replays > 20
    assert len({tuple(t) for t in ovl}) == 5


def test_bf16_sort_keys_give_the_float32_sorts_tokens(torch, ops) -> None:
    """bf16-valued logits have many exact ties; the stable order, and so every
    sampled token, is the same whichever dtype the keys are sorted in."""
    from overlapd.stages.sampler import Sampler, SamplingTensors, seed_state

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
    a = Sampler(ops, vocab, sort_dtype="bfloat16").sample(logits, p, any_random=True)
    b = Sampler(ops, vocab).sample(logits, p, any_random=True)
    assert torch.equal(a, b)
    assert len(set(a.tolist())) > rows // 2


def test_the_8b_shape_is_drawn_on_the_device_with_its_real_shape(torch, ops) -> None:
    from overlapd.stages.engine_config import EngineConfig
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
