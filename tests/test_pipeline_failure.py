"""A pipeline stage that dies must not hang the daemon's shutdown.

Found by tests/test_reliability_fuzz.py: a hostile `top_k` killed the
preprocess stage while it held an in-flight permit, and Pipeline.close()
then waited forever for that permit, so `overlapd serve` never exited.
The real pipeline (tiny model, Paddle, a real ring) runs here in-process;
the only thing injected is the fault itself, since the hostile value that
caused it is refused now.
"""

from __future__ import annotations

import asyncio

from overlapd.daemon.engine_api import GenerateParams
from overlapd.kernels.ring import RingReader, Step
from overlapd.stages.engine.config import EngineConfig
from overlapd.stages.pipeline import Pipeline
from overlapd.stages.pipeline_config import PipelineConfig, RingConfig


class Ends:
    """A RequestSink that records how each request ended."""

    def __init__(self) -> None:
        self.ends: list[str] = []

    def on_tokens(self, token_ids, text, logprobs) -> None:
        pass

    def on_done(self, finish_reason: str, prompt_tokens: int, completion_tokens: int) -> None:
        self.ends.append(finish_reason)

    def on_error(self, code: str, message: str) -> None:
        self.ends.append(code)


def test_a_dead_stage_does_not_hang_shutdown_and_live_requests_still_end(tmp_path):
    ring_path = tmp_path / "r.ring"

    async def main() -> None:
        p = Pipeline(EngineConfig(model="tiny", max_model_len=64), PipelineConfig(), RingConfig(path=str(ring_path)))
        await p.start()
        reader = RingReader(ring_path)
        sink = Ends()

        def broken_prepare(so: object) -> object:
            raise OverflowError("injected: a value the staging buffers cannot hold")

        p.engine.runner.prepare = broken_prepare  # the fault, inside the preprocess stage
        p.submit(GenerateParams(prompt="hello", max_tokens=8), sink)
        await asyncio.wait_for(p.failure.wait(), 30)
        assert isinstance(p.failed, OverflowError)
        await asyncio.wait_for(p.drain(timeout=0), 10)  # hung forever before the fix
        assert sink.ends == ["aborted"]
        last = None
        while (item := reader.read(timeout=1)) is not None:
            if isinstance(item, Step):
                last = item
        reader.close()
        assert last is not None and last.view.step_id < 0  # the ring still got its last record

    asyncio.run(asyncio.wait_for(main(), 60))
