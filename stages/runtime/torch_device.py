"""CUDA mechanics under the Torch ops layer: a device-to-host copy that an
event completes, and a captured graph with its fixed-address outputs. On the
CPU a host copy is a clone (a replayed graph rewrites its outputs in place)."""

from __future__ import annotations

import gc
from typing import Callable

import numpy as np
import torch

Tensor = torch.Tensor


class HostCopy:
    """A device-to-host copy: on CUDA into pinned memory, completed by an event
    (torch's pinned allocator; the native pool is preferred where it exists)."""

    def __init__(self, x: Tensor) -> None:
        if x.is_cuda:
            self._host = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
            self._host.copy_(x, non_blocking=True)
            self._event: torch.cuda.Event | None = torch.cuda.Event()
            self._event.record()
        else:
            # A copy, not an alias: a replayed graph rewrites its outputs in place.
            self._host, self._event = x.clone(), None

    def result(self) -> np.ndarray:
        if self._event is not None:
            self._event.synchronize()
        x = self._host if self._host.dtype != torch.bfloat16 else self._host.float()
        return x.numpy()


class TorchGraph:
    """A captured CUDA graph and the tensors its capture returned (fixed addresses)."""

    def __init__(self, fn: Callable[[], object], pool: object) -> None:
        # Warm up on a side stream first: lazy initializations (cuBLAS
        # workspaces, allocator growth) must not happen inside the capture.
        # The run is real work with the step's real inputs; it writes what the
        # replay writes again (the step's KV entries, its sampled ids).
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        # No garbage collection inside the capture: a collection there could free
        # an older graph held by a dead cycle, and destroying one is not allowed
        # while this thread captures (torch warns "operation not permitted when
        # stream is capturing" from CUDAGraph::reset). The garbage waits for the
        # next collection outside.
        collecting = gc.isenabled()
        gc.disable()
        try:
            # thread_local: the loop thread may wait on events while we capture here.
            with torch.cuda.graph(self.graph, pool=pool, capture_error_mode="thread_local"):
                self.output = fn()
        finally:
            if collecting:
                gc.enable()

    def replay(self) -> None:
        self.graph.replay()
