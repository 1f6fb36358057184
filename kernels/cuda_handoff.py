"""The GPU side of the handoff, framework-neutral, over raw stream handles.

`native()` is the compiled `_cuda` module where it was built (OVERLAPD_CUDA=1)
and a device is visible, else None: every caller keeps a CPU path, so the
engine, its tests and CI run unchanged without CUDA.

- `PinnedCopies`: device-to-host copies into a bounded pool of page-locked
  buffers (cudaHostAlloc), each completed by an event recorded behind it.
- `signal_after(stream, fd)`: a host function queued on the stream adds 1 to
  the pipeline's eventfd once everything queued before it (the step's copies
  too) has run, so the loop wakes through add_reader and never polls.
- `spin_waiter(fd)`: the latency-mode alternative: a native thread (no GIL)
  polls an event recorded behind each step and writes the same eventfd; it
  costs a core while steps are in flight. It is the execute stage's default
  on a GPU (measured faster); `OVERLAPD_WAKE=hostfunc` selects the host
  function. bench/gpu.py measures both.
"""

from __future__ import annotations

from types import ModuleType

import numpy as np

_native: ModuleType | None = None
_probed = False


def native() -> ModuleType | None:
    """The `_cuda` extension if it was built and a CUDA device is visible."""
    global _native, _probed
    if not _probed:
        _probed = True
        try:
            from overlapd.kernels import _cuda  # type: ignore[attr-defined]
        except ImportError:
            _cuda = None
        _native = _cuda if _cuda is not None and _cuda.device_count() > 0 else None
    return _native


def signal_after(stream: int, fd: int) -> bool:
    """Queue the eventfd signal behind `stream`'s work; False where there is no
    CUDA (the caller then signals itself, as the CPU path does)."""
    mod = native()
    if mod is None:
        return False
    mod.signal_eventfd(stream, fd)
    return True


def spin_waiter(fd: int) -> object | None:
    """A native SpinWaiter signalling `fd` (its `watch(stream)` queues a step), or None without CUDA."""
    mod = native()
    return mod.SpinWaiter(fd) if mod is not None else None


class PendingCopy:
    """One copy in flight into a pinned buffer; `result()` waits, copies out, frees the buffer."""

    __slots__ = ("_pool", "_slot", "_event", "_dtype", "_shape", "_nbytes")

    def __init__(self, pool: "PinnedCopies", slot: int, event: object, dtype: np.dtype, shape: tuple[int, ...],
                 nbytes: int) -> None:
        self._pool, self._slot, self._event = pool, slot, event
        self._dtype, self._shape, self._nbytes = dtype, shape, nbytes

    def done(self) -> bool:
        return self._slot < 0 or bool(self._event.query())

    def result(self) -> np.ndarray:
        if self._slot < 0:
            raise RuntimeError("result() of this copy was already taken")
        self._event.synchronize()  # releases the GIL; at once when the host function already fired
        view = self._pool.pool.view(self._slot, self._nbytes)
        out = np.frombuffer(view, dtype=self._dtype).reshape(self._shape).copy()
        self._release()
        return out

    def _release(self) -> None:
        if self._slot >= 0:
            self._pool.pool.release(self._slot)
            self._slot = -1

    def __del__(self) -> None:
        # A step whose outputs nobody collected (a failed or aborted step) must
        # not keep its buffer: wait for the copy to land, then give it back.
        if self._slot >= 0:
            try:
                self._event.synchronize()
                self._release()
            except Exception:
                pass


class PinnedCopies:
    """A bounded pool of page-locked landing buffers for device-to-host copies."""

    def __init__(self, slot_bytes: int = 1 << 20, slots: int = 8) -> None:
        mod = native()
        if mod is None:
            raise RuntimeError("PinnedCopies needs the _cuda extension and a CUDA device")
        self._mod = mod
        self.pool = mod.PinnedPool(slot_bytes, slots)
        self.slot_bytes = slot_bytes

    def fits(self, nbytes: int) -> bool:
        return 0 < nbytes <= self.slot_bytes

    def copy_async(self, src_ptr: int, nbytes: int, dtype: np.dtype, shape: tuple[int, ...], stream: int) -> PendingCopy:
        """Start copying `nbytes` of contiguous device memory at `src_ptr` on `stream`."""
        slot = self.pool.acquire()
        try:
            self._mod.memcpy_d2h_async(self.pool.ptr(slot), src_ptr, nbytes, stream)
            event = self._mod.Event(False)
            event.record(stream)
        except BaseException:
            self.pool.release(slot)
            raise
        return PendingCopy(self, slot, event, np.dtype(dtype), tuple(shape), nbytes)

    @property
    def available(self) -> int:
        return int(self.pool.available)


__all__ = ["PendingCopy", "PinnedCopies", "native", "signal_after", "spin_waiter"]
