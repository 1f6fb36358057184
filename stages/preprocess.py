"""Stage 1, preprocess: admission, scheduling and filling the step's inputs.

Runs on the event loop. It holds one of `max_inflight` permits per step it
schedules (1 without overlap, `overlap_depth` with: 3 by default), so with
overlap steps N+1 and N+2 are scheduled and prepared while step N is still on
the device, and without it the order is strictly schedule, run, process.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from overlapd.stages.step_types import SchedulerOutput

if TYPE_CHECKING:
    from overlapd.stages.pipeline import Pipeline
    from overlapd.stages.runner.model_runner import PreparedStep


@dataclass(slots=True)
class Prepared:
    """A scheduled step whose inputs are staged, waiting for the execute stage."""

    so: SchedulerOutput
    prepared: PreparedStep


async def preprocess_loop(p: Pipeline) -> None:
    while True:
        await p.inflight.acquire()
        try:
            so = await _next_batch(p)
            t0 = time.perf_counter()
            prepared = p.engine.runner.prepare(so)
            p.times.add("preprocess", time.perf_counter() - t0)
            await p.q_prepared.put(Prepared(so, prepared))
        except asyncio.CancelledError:
            # Shutting down: no step under this permit reached the device.
            p.inflight.release()
            raise


async def _next_batch(p: Pipeline) -> SchedulerOutput:
    """Schedule the next step, sleeping while there is nothing to run."""
    while True:
        p.work_available.clear()
        t0 = time.perf_counter()
        p.admit_waiting()
        so = p.engine.scheduler.schedule()
        p.times.add("preprocess", time.perf_counter() - t0)
        if not so.is_empty:
            return so
        # Nothing runnable: new requests, or outputs that finish or free work, wake us.
        await p.work_available.wait()
