"""Stage 2, execute: launches each step on one dedicated thread and moves on.

The framework releases the GIL inside its kernels, so the loop keeps running
while the device (or, on a CPU, this thread) works. Completion is signalled in
launch order through the pipeline's `CompletionQueue`: the loop never polls and
this stage never waits for the device.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from typing import TYPE_CHECKING

from overlapd.stages.step_types import SchedulerOutput

if TYPE_CHECKING:
    from overlapd.stages.pipeline import Pipeline


class InFlight:
    """A launched step: its schedule, the launch's result and its completion signal."""

    __slots__ = ("so", "launched", "done")

    def __init__(self, so: SchedulerOutput, launched: concurrent.futures.Future, done: asyncio.Future[None]) -> None:
        self.so = so
        self.launched = launched
        self.done = done


class Executor:
    def __init__(self, p: Pipeline) -> None:
        self._p = p
        self._thread = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="overlapd-execute")

    async def run(self) -> None:
        p = self._p
        while True:
            item = await p.q_prepared.get()
            done = p.completions.wait()  # taken before launching: completions arrive in launch order
            launched = self._thread.submit(self._launch, item.prepared)
            await p.q_launched.put(InFlight(item.so, launched, done))

    def _launch(self, prepared: object) -> object:
        """On the execute thread: start the step; signal completion however it ends."""
        t0 = time.perf_counter()
        try:
            return self._p.engine.runner.launch(prepared)
        finally:
            self._p.times.add("launch", time.perf_counter() - t0)
            # On the CPU the step's results exist once launch returns. A GPU
            # runtime signals from a host function queued behind the step instead.
            self._p.completions.signal()

    def shutdown(self) -> None:
        self._thread.shutdown(wait=True, cancel_futures=False)
