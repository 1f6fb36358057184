"""Stage 4, emit: one STEP record per step to the ring, then the clients' frames."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from overlapd.stages.output.processor import RingRows
    from overlapd.stages.pipeline import Pipeline
    from overlapd.stages.postprocess import Processed

# While a backpressure reader holds the ring, retry this often. The bounded
# queues behind us fill meanwhile, which is what pauses admission.
BACKPRESSURE_RETRY_S = 0.0005


async def emit_loop(p: Pipeline) -> None:
    while True:
        item: Processed = await p.q_processed.get()
        t0 = time.perf_counter()
        if p.ring is not None and item.ring_rows is not None and len(item.ring_rows.request_id):
            await publish(p, item.ring_rows)
        p.deliver(item.outputs)
        p.times.add("emit", time.perf_counter() - t0)
        p.times.step_done()
        p.q_processed.task_done()


async def publish(p: Pipeline, rows: RingRows) -> None:
    while True:
        seq = p.ring.publish_step(**rows.columns())
        if seq is not None:
            p.ring_records += 1
            return
        p.ring.evict_dead_readers()
        await asyncio.sleep(BACKPRESSURE_RETRY_S)
