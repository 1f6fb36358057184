"""Stage 4, emit: one STEP record per step to the ring, then the clients' frames."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
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
            await publish(p, item.step_id, item.ring_rows)
        p.deliver(item.outputs)
        p.times.add("emit", time.perf_counter() - t0)
        p.times.step_done()
        p.q_processed.task_done()


async def publish(p: Pipeline, step_id: int, rows) -> None:
    while True:
        seq = p.ring.publish_step(
            step_id=step_id,
            request_id=rows.request_id,
            finish=rows.finish,
            tokens=rows.tokens,
            logprobs=rows.logprobs,
            ranks=rows.ranks,
        )
        if seq is not None:
            p.ring_records += 1
            return
        p.ring_evicted += p.ring.evict_dead_readers()
        await asyncio.sleep(BACKPRESSURE_RETRY_S)
