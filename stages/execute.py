"""Stage 2, execute: launches each step on one dedicated thread and moves on.

The framework releases the GIL inside its kernels, so the loop keeps running
while the device (or, on a CPU, this thread) works. Completion is signalled in
launch order through the pipeline's `CompletionQueue`: the loop never polls and
this stage never waits for the device. On a GPU (with the `_cuda` extension) the
signal is a host function queued on the stream behind the step's output copies,
so the loop wakes when the outputs are on the host, not when launch returns.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from typing import TYPE_CHECKING

from overlapd.kernels import cuda_handoff
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
        ops = p.engine.ops
        self._on_device = ops.device == "gpu" and cuda_handoff.native() is not None

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
        queued = False
        try:
            handle = self._p.engine.runner.launch(prepared)
            if self._on_device:
                # The stream is this thread's current one: the one launch used.
                queued = cuda_handoff.signal_after(self._p.engine.ops.current_stream_handle(),
                                                   self._p.completions.fd)
            return handle
        finally:
            self._p.times.add("launch", time.perf_counter() - t0)
            if not queued:
                # On the CPU the step's results exist once launch returns; a
                # failed launch must still wake its waiter.
                self._p.completions.signal()

    def shutdown(self) -> None:
        self._thread.shutdown(wait=True, cancel_futures=False)
