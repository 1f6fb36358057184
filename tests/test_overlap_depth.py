"""Three steps in flight (PipelineConfig.overlap_depth = 3) give the tokens and
endings of the synchronous order: the real pipeline, tiny model, in-process."""

from __future__ import annotations

import asyncio

import pytest
from overlapd.daemon.engine_api import GenerateParams
from overlapd.daemon.sinks import CollectSink
from overlapd.stages.engine.config import EngineConfig
from overlapd.stages.pipeline import Pipeline
from overlapd.stages.pipeline_config import PipelineConfig, RingConfig

REQUESTS = [
    GenerateParams(prompt="Once upon a time", max_tokens=24, temperature=0.0),
    GenerateParams(prompt="The cat", max_tokens=20, temperature=0.9, top_p=0.9, seed=7),
    GenerateParams(prompt="In the morning", max_tokens=16, temperature=1.0, top_k=20, seed=3, logprobs=2),
    GenerateParams(prompt="A", max_tokens=3, temperature=0.0),
    GenerateParams(prompt="Hello there", max_tokens=30, temperature=0.0, ignore_eos=True),
]


def run(tmp_path, cfg: PipelineConfig, extra: list[GenerateParams] = ()) -> list[tuple[list[int], str]]:
    peak = [0]  # most steps in flight at once

    async def main() -> list[tuple[list[int], str]]:
        p = Pipeline(EngineConfig(model="tiny", max_model_len=128), cfg, RingConfig(path=str(tmp_path / f"{id(cfg)}.ring")))
        # steps prepared and not yet processed: what the depth bounds
        runner, outputs = p.engine.runner, p.engine.output_processor
        prepare, process = runner.prepare, outputs.process
        outstanding = 0

        def counted_prepare(so):
            nonlocal outstanding
            outstanding += 1
            peak[0] = max(peak[0], outstanding)
            return prepare(so)

        def counted_process(so, out):
            nonlocal outstanding
            outstanding -= 1
            return process(so, out)

        runner.prepare, outputs.process = counted_prepare, counted_process
        await p.start()
        loop = asyncio.get_running_loop()
        sinks = [CollectSink(loop) for _ in [*REQUESTS, *extra]]
        for params, sink in zip([*REQUESTS, *extra], sinks):
            p.submit(params, sink)
        ends = [await asyncio.wait_for(s.done, 60) for s in sinks]
        await p.drain(timeout=5)
        return [(s.tokens, e) for s, e in zip(sinks, ends)]

    out = asyncio.run(main())
    assert peak[0] == cfg.max_inflight, (peak[0], cfg.max_inflight)  # the depth was really used
    return out


def test_three_steps_in_flight_give_the_synchronous_tokens(tmp_path):
    sync = run(tmp_path, PipelineConfig(overlap=False))
    # a stop token the greedy request meets mid-way: with three steps in flight
    # two more rows of it are already launched when its stop comes back
    tokens = sync[0][0]
    stop = GenerateParams(prompt="Once upon a time", max_tokens=24, temperature=0.0, stop_token_ids=[tokens[5]])
    sync += run(tmp_path, PipelineConfig(overlap=False), [stop])[len(REQUESTS):]
    for depth in (2, 3):
        got = run(tmp_path, PipelineConfig(overlap_depth=depth), [stop])
        assert got == sync, depth
    assert sync[-1][1] == "stop" and len(sync[-1][0]) <= 6
    assert sync[3] == (sync[3][0], "length") and len(sync[3][0]) == 3


def test_overlap_depth_is_bounded():
    with pytest.raises(ValueError, match="overlap_depth"):
        PipelineConfig(overlap_depth=1)
    with pytest.raises(ValueError, match="overlap_depth"):
        PipelineConfig(overlap_depth=9)
