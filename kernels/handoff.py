"""Handing a step's completion from the execute thread (or the device) to the event loop.

Steps finish in launch order (one stream, one execute thread), so one eventfd
in counter mode is enough. Whoever finishes a step (the execute thread on the
CPU; a host function queued behind the step on the device stream, on a GPU)
adds 1; the loop wakes through `add_reader`, reads the count and resolves that
many waiters in FIFO order. No polling, no thread parked on the loop.

The bounded buffers themselves are the runner's staging pool
(`stages/runner/input_batch.py`); the pipeline's in-flight permits keep it from
running dry.
"""

from __future__ import annotations

import asyncio
import collections
import os


class CompletionQueue:
    """FIFO completion signals from any thread to one asyncio loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._ready = 0  # completions that arrived before anyone waited
        loop.add_reader(self._fd, self._on_readable)

    @property
    def fd(self) -> int:
        """The eventfd a native host callback writes to (cudaLaunchHostFunc on a GPU)."""
        return self._fd

    def signal(self) -> None:
        """Mark the oldest outstanding step done. Safe from any thread."""
        os.eventfd_write(self._fd, 1)

    def wait(self) -> asyncio.Future[None]:
        """A future for the next completion in launch order."""
        fut = self._loop.create_future()
        if self._ready:
            self._ready -= 1
            fut.set_result(None)
        else:
            self._waiters.append(fut)
        return fut

    def _on_readable(self) -> None:
        try:
            count = os.eventfd_read(self._fd)
        except BlockingIOError:
            return
        for _ in range(count):
            while self._waiters and self._waiters[0].cancelled():
                self._waiters.popleft()
            if self._waiters:
                self._waiters.popleft().set_result(None)
            else:
                self._ready += 1

    def close(self) -> None:
        if self._fd >= 0:
            self._loop.remove_reader(self._fd)
            os.close(self._fd)
            self._fd = -1
