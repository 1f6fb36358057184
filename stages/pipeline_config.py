"""Pipeline and ring settings (the `[pipeline]` and `[ring]` tables of the config file)."""

from __future__ import annotations

import msgspec


class PipelineConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    # Overlap: step N+1 is scheduled and launched while step N is in flight.
    # Off (`--no-overlap`) keeps the simple order: schedule, run, process, emit.
    overlap: bool = True
    max_waiting: int = 256  # admitted but not yet scheduled; more answers `overloaded`
    queue_depth: int = 2  # each inter-stage queue's bound
    heartbeat_interval_s: float = 0.5

    @property
    def max_inflight(self) -> int:
        """Steps scheduled but not yet processed: the size of the output buffer pool."""
        return 2 if self.overlap else 1


class RingConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    enabled: bool = True
    path: str = "/dev/shm/overlapd.ring"
    capacity: int = 16 << 20  # bytes, a power of two >= 65536
    mode: int = 0o640
    group: str | None = None  # chown the ring to this group so its readers can map it
    backpressure: bool = False  # never overwrite what a registered reader has not read
