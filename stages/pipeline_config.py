"""Pipeline and ring settings (the `[pipeline]` and `[ring]` tables of the config file)."""

from __future__ import annotations

import msgspec

MAX_OVERLAP_DEPTH = 4  # each step in flight holds a staging buffer and a pinned output slot


class PipelineConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    # Overlap: step N+1 is scheduled and launched while step N is in flight.
    # Off (`--no-overlap`) keeps the simple order: schedule, run, process, emit.
    overlap: bool = True
    # With overlap, steps scheduled but not yet processed. 2: step N+1 is
    # prepared and launched while N runs, so the host's work for a step must
    # fit in one device step. 3 (the default) gives it two: on an H100 the 1B
    # model's batch-64 step (1.8 ms) is as short as the host's work for it,
    # and depth 3 took it from 1.08x to 1.04x of the device-only step time
    # (docs/benchmarks.md). Decode inputs still come from the previous launch
    # on the device; a finished request costs up to two discarded rows
    # instead of one, and a new request waits one step longer for its first.
    overlap_depth: int = 3
    max_waiting: int = 256  # admitted but not yet scheduled; more answers `overloaded`
    queue_depth: int = 2  # each inter-stage queue's bound
    heartbeat_interval_s: float = 0.5

    def __post_init__(self) -> None:
        if not 2 <= self.overlap_depth <= MAX_OVERLAP_DEPTH:
            raise ValueError(f"`overlap_depth` must be between 2 and {MAX_OVERLAP_DEPTH}, not {self.overlap_depth}.")

    @property
    def max_inflight(self) -> int:
        """Steps scheduled but not yet processed: the size of the output buffer pool."""
        return self.overlap_depth if self.overlap else 1


class RingConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    enabled: bool = True
    path: str = "/dev/shm/overlapd.ring"
    capacity: int = 16 << 20  # bytes, a power of two >= 65536
    mode: int = 0o640
    group: str | None = None  # chown the ring to this group so its readers can map it
    backpressure: bool = False  # never overwrite what a registered reader has not read
