"""Python faces of the shared-memory ring (SPEC.md section 1).

`RingWriter` packs steps straight into the ring's reserved bytes; `RingReader`
yields decoded steps and the ring's events (lost records, a new epoch, a dead
or closed producer). The lock-free protocol itself lives in C
(`kernels/include/overlapd/ring.h`, `kernels/src/ring_writer.cpp`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from overlapd.kernels import _native
from overlapd.kernels.meta import StepView, step_columns, unpack_step, write_step

RingError = _native.RingError

DEFAULT_RING_PATH = "/dev/shm/overlapd.ring"
DEFAULT_CAPACITY = 16 << 20
RECORD_STEP = 1


@dataclass(frozen=True, slots=True)
class Step:
    """One STEP record as a reader sees it."""

    seq: int
    publish_ns: int
    view: StepView


@dataclass(frozen=True, slots=True)
class Lost:
    """Records [first_seq, last_seq] were overwritten before this reader got them."""

    first_seq: int
    last_seq: int

    @property
    def records(self) -> int:
        return self.last_seq - self.first_seq + 1


@dataclass(frozen=True, slots=True)
class EpochChanged:
    """The producer restarted (or re-created the ring); the reader resynced at its tail."""

    epoch: int


@dataclass(frozen=True, slots=True)
class ProducerGone:
    """The heartbeat went stale without a clean close: the producer died."""


@dataclass(frozen=True, slots=True)
class ProducerClosed:
    """The producer closed the ring cleanly and everything it wrote was read."""


RingEvent = Lost | EpochChanged | ProducerGone | ProducerClosed


class RingWriter:
    """The single producer. Not thread-safe: one stage owns it."""

    def __init__(
        self,
        path: str | os.PathLike[str] = DEFAULT_RING_PATH,
        *,
        capacity: int = DEFAULT_CAPACITY,
        max_slots: int = 256,
        vocab_size: int = 0,
        model_name: str = "",
        mode: int = 0o640,
        backpressure: bool = False,
    ) -> None:
        self.path = Path(path)
        self._native = _native.RingWriter(
            str(path), capacity, max_slots, vocab_size, model_name, mode, backpressure
        )

    @property
    def epoch(self) -> int:
        return self._native.epoch

    @property
    def next_seq(self) -> int:
        return self._native.next_seq

    @property
    def max_record_bytes(self) -> int:
        return self._native.max_record_bytes

    def publish_step(self, **columns: Any) -> int | None:
        """Pack a step into the ring and commit it: its seq, or None when a
        backpressure reader has not yet consumed the bytes it would overwrite.

        The keyword arguments are `meta.step_columns`'s: step_id, request_id,
        finish, tokens, and optionally accept_num, logprobs, ranks, flag.
        """
        cols = step_columns(**columns)
        view = self._native.try_reserve(cols.layout.size)
        if view is None:
            return None
        write_step(view, cols)  # cannot fail: the columns were checked above
        return self._native.commit()

    def heartbeat(self) -> None:
        self._native.heartbeat()

    def evict_dead_readers(self) -> int:
        return self._native.evict_dead_readers()

    def readers_evicted(self) -> int:
        """Dead readers' slots this writer freed, by `evict_dead_readers` or on its own while publishing."""
        return self._native.readers_evicted()

    def active_readers(self) -> int:
        return self._native.active_readers()

    def close(self, clean: bool = True) -> None:
        self._native.close(clean)

    def __enter__(self) -> RingWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RingReader:
    """Iterates the ring's records as `Step`s interleaved with `RingEvent`s."""

    def __init__(
        self,
        path: str | os.PathLike[str] = DEFAULT_RING_PATH,
        *,
        from_head: bool = False,
        backpressure: bool = False,
        stale_after: float = 3.0,
        spin_us: float = 4.0,
    ) -> None:
        """`spin_us`: how long a waiting reader busy-waits before sleeping; raise
        it to trade a core for lower latency (a futex wake-up costs tens of us)."""
        self.path = Path(path)
        self._native = _native.RingReader(
            str(path), from_head, backpressure, int(stale_after * 1000), spin_ns=int(spin_us * 1000)
        )

    @property
    def epoch(self) -> int:
        return self._native.epoch

    @property
    def model_name(self) -> str:
        return self._native.model_name

    @property
    def vocab_size(self) -> int:
        return self._native.vocab_size

    @property
    def lost_total(self) -> int:
        return self._native.lost_total

    def read(self, timeout: float | None = None) -> Step | RingEvent | None:
        """The next step or event; None when `timeout` seconds pass with neither."""
        timeout_ms = -1 if timeout is None else max(0, int(timeout * 1000))
        while True:
            item = self._native.next(timeout_ms)
            kind = item[0]
            if kind == "record":
                _, seq, publish_ns, rtype, body = item
                if rtype != RECORD_STEP:
                    continue  # a record type this version does not know: skip it
                return Step(seq, publish_ns, unpack_step(body))
            if kind == "lost":
                return Lost(item[1], item[2])
            if kind == "epoch":
                return EpochChanged(item[1])
            if kind == "gone":
                return ProducerGone()
            if kind == "closed":
                return ProducerClosed()
            if kind == "timeout":
                return None
            raise RingError(f"unexpected reader result {kind!r}")

    def __iter__(self) -> Iterator[Step | RingEvent]:
        while True:
            item = self.read()
            if item is not None:
                yield item

    def close(self) -> None:
        self._native.close()

    def __enter__(self) -> RingReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
