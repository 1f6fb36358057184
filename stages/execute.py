"""Stage 2, execute: launches each step on one dedicated thread and moves on.

The framework releases the GIL inside its kernels, so the loop keeps running
while the device (or, on a CPU, this thread) works. Completion is signalled in
launch order through the pipeline's `CompletionQueue`: the loop never polls and
this stage never waits for the device. On a GPU (with the `_cuda` extension) the
signal comes from behind the step's output copies on the stream (a native
thread polling an event, or a host function), so the loop wakes when the
outputs are on the host, not when launch returns.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
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
        # How the loop learns a step finished (bench/gpu.py measures both; see
        # docs/benchmarks.md "GPU (H100)"). "spin" (default): a native thread
        # polls an event behind each step: the loop woke ~35 us sooner and the
        # GPU idled ~1 us between steps instead of ~120 us, for one core kept
        # busy while steps are in flight. "hostfunc": cudaLaunchHostFunc
        # writes the eventfd; no thread, no busy core.
        self._spin = cuda_handoff.spin_waiter(p.completions.fd) \
            if self._on_device and os.environ.get("OVERLAPD_WAKE", "spin") == "spin" else None

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
                stream = self._p.engine.ops.current_stream_handle()
                if self._spin is not None:
                    self._spin.watch(stream)
                    queued = True
                else:
                    queued = cuda_handoff.signal_after(stream, self._p.completions.fd)
            return handle
        finally:
            self._p.times.add("launch", time.perf_counter() - t0)
            if not queued:
                # On the CPU the step's results exist once launch returns; a
                # failed launch must still wake its waiter.
                self._p.completions.signal()

    def shutdown(self, wait: bool = True) -> None:
        self._thread.shutdown(wait=wait, cancel_futures=not wait)
        self._spin = None  # joins its thread (after signalling what was queued) before the eventfd closes
