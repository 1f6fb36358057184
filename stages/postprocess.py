"""Stage 3, postprocess: waits for a step's outputs without blocking the loop,
applies stop conditions, detokenizes, frees finished requests' KV blocks."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import structlog

if TYPE_CHECKING:
    from overlapd.stages.execute import InFlight
    from overlapd.stages.output.processor import RequestOutput, RingRows
    from overlapd.stages.pipeline import Pipeline

log = structlog.get_logger("overlapd.postprocess")


@dataclass(slots=True)
class Processed:
    """One step's results, ready to be written to the ring and the sockets."""

    step_id: int
    outputs: list[RequestOutput]
    ring_rows: RingRows | None  # None when the step failed


async def postprocess_loop(p: Pipeline) -> None:
    while True:
        item: InFlight = await p.q_launched.get()
        t_wait = time.perf_counter()
        await item.done
        t0 = time.perf_counter()
        p.times.add("wait", t0 - t_wait)
        try:
            handle = item.launched.result()
            out = p.engine.runner.collect(handle)
            outputs, ring_rows = p.engine.output_processor.process(item.so, out)
        except Exception as exc:  # a failed step must not take the daemon down
            log.exception("step_failed", step_id=item.so.step_id)
            outputs, ring_rows = p.fail_step(item.so, exc), None
        p.times.add("postprocess", time.perf_counter() - t0)
        p.inflight.release()
        p.work_available.set()
        await p.q_processed.put(Processed(item.so.step_id, outputs, ring_rows))
