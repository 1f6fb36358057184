"""The real pipeline (four stages, runner, ring) on the GPU with the Torch runtime:
overlap and sync give identical greedy and seeded tokens, and the ring carries
exactly what the request sinks received."""

from __future__ import annotations

import asyncio
import collections
import os
import tempfile

import pytest
from gpu_support import cuda_torch, requires_gpu
from overlapd.daemon.sinks import CollectSink

pytestmark = requires_gpu


def _requests(greedy_only: bool = False):
    from overlapd.daemon.engine_api import GenerateParams

    out = []
    for i in range(12):
        prompt = [(13 * i + j) % 500 + 3 for j in range(5 + 3 * i)]
        seeded = i % 2 == 1 and not greedy_only
        out.append(GenerateParams(prompt_ids=prompt, max_tokens=24 + i, ignore_eos=True,
                                  temperature=0.8 if seeded else 0.0, top_p=0.9 if seeded else 1.0,
                                  top_k=40 if seeded else 0, seed=100 + i if seeded else None))
    return out


async def _run(overlap: bool, dtype: str, greedy_only: bool = False, graphs: bool = True, requests=None):
    from overlapd.kernels.ring import RingReader, Step
    from overlapd.stages.engine.config import EngineConfig
    from overlapd.stages.pipeline import Pipeline
    from overlapd.stages.pipeline_config import PipelineConfig, RingConfig

    cfg = EngineConfig(model="tiny", runtime="torch", device="gpu", dtype=dtype, max_num_seqs=8, max_num_batched_tokens=64,
                       max_model_len=256, block_size=16)
    ring = RingConfig(path=os.path.join(tempfile.gettempdir(), f"overlapd-gpu-test-{os.getpid()}.ring"))
    p = Pipeline(cfg, PipelineConfig(overlap=overlap), ring)
    if not graphs:
        p.engine.runner.graphs = None
    await p.start()
    reader = RingReader(ring.path, from_head=True)
    loop = asyncio.get_running_loop()
    sinks, ids = [], []
    for params in requests if requests is not None else _requests(greedy_only):
        s = CollectSink(loop)
        ids.append(p.submit(params, s))
        sinks.append(s)
    await asyncio.wait_for(asyncio.gather(*(s.done for s in sinks)), 120)
    await p.drain(timeout=5)
    ring_tokens: dict[int, list[int]] = collections.defaultdict(list)
    while (item := reader.read(timeout=0.5)) is not None:
        if isinstance(item, Step):
            v = item.view
            for i, rid in enumerate(v.request_id):
                ring_tokens[int(rid)].extend(int(t) for t in v.tokens[i, : v.accept_num[i], 0])
            if v.step_id < 0:
                break
    reader.close()
    os.unlink(ring.path)
    g = p.engine.runner.graphs
    replays = g.replays if g is not None else 0
    return [s.tokens for s in sinks], dict(zip(ids, (s.tokens for s in sinks))), dict(ring_tokens), replays


@pytest.mark.parametrize("dtype,wake", [("float32", "spin"), ("bfloat16", "spin"), ("float32", "hostfunc")])
def test_overlap_and_sync_give_identical_tokens_and_the_ring_matches_the_sinks(dtype, wake, monkeypatch):
    cuda_torch()
    monkeypatch.setenv("OVERLAPD_WAKE", wake)  # how the execute stage signals completion
    sync_tokens, sync_by_id, sync_ring, _ = asyncio.run(_run(False, dtype))
    ovl_tokens, ovl_by_id, ovl_ring, _ = asyncio.run(_run(True, dtype))
    assert [len(t) for t in ovl_tokens] == [24 + i for i in range(12)]
    assert ovl_tokens == sync_tokens
    assert ovl_ring == ovl_by_id and sync_ring == sync_by_id
    assert len({tuple(t) for t in ovl_tokens}) > 6  # not one degenerate stream


def test_cuda_graph_replay_gives_the_eager_tokens_in_both_modes():
    """Greedy requests: decode steps replay captured graphs (padded row buckets
    as requests finish); tokens equal the eager run's, with and without overlap."""
    cuda_torch()
    eager, *_ = asyncio.run(_run(True, "float32", greedy_only=True, graphs=False))
    ovl, _, ovl_ring, replays = asyncio.run(_run(True, "float32", greedy_only=True))
    sync, _, _, sync_replays = asyncio.run(_run(False, "float32", greedy_only=True))
    assert replays > 20 and sync_replays > 20
    assert ovl == eager and sync == eager


def test_a_request_alone_gives_the_same_tokens_through_the_fused_products(monkeypatch):
    """A request alone decodes one token a step: LlamaModel's one-token path
    (kernels/triton_gemv.py, programmatic dependent launch on Hopper) gives
    cuBLAS's tokens in float32, replayed from graphs and eagerly, overlapped
    and not."""
    cuda_torch()
    from overlapd.daemon.engine_api import GenerateParams

    alone = [GenerateParams(prompt_ids=[(7 * j) % 500 + 3 for j in range(40)], max_tokens=60, ignore_eos=True,
                            temperature=0.0)]
    monkeypatch.setenv("OVERLAPD_GEMV", "0")
    cublas, *_ = asyncio.run(_run(True, "float32", requests=alone))
    monkeypatch.delenv("OVERLAPD_GEMV")
    graphs, _, ring, replays = asyncio.run(_run(True, "float32", requests=alone))
    eager, *_ = asyncio.run(_run(False, "float32", requests=alone, graphs=False))
    assert replays > 40 and len(graphs[0]) == 60
    assert graphs == cublas and eager == cublas
    assert list(ring.values()) == graphs
