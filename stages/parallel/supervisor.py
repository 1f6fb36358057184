"""Rank 0's side of tensor parallelism, in the daemon process.

`TensorParallel` starts ranks 1..N-1 as worker processes (multiprocessing's
spawn context: a fresh interpreter, never a fork of a process with threads
or CUDA), joins the process group with them, and from then on:

- launch (the execute thread): sends each step's staged inputs to every
  worker over its connection (a socketpair; msgspec bytes, no pickle), then
  runs the step here. Workers follow the steps in order, so overlap works as
  with one rank: step N+1 is sent and launched while N's outputs come home.
- watch (the event loop): a worker's exit, seen on its process sentinel, or
  any failure of a step here breaks the group for good: `on_failure` runs on
  the loop (the pipeline fails every live request with an error frame and
  the daemon exits nonzero), and later launches raise at once instead of
  entering a collective that no peer will join.
- close: ends the workers' connections (their order to exit), waits for
  them, kills what is left. Workers also exit on their own when this process
  dies (worker.py).

Why a socketpair and not a broadcast on a gloo group: a worker waits for the
next step as long as the daemon is idle, and a gloo receive fails after the
group's timeout; a socketpair waits without one, and its EOF tells a worker
the daemon is gone.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import Callable

import msgspec
import structlog

from ..engine.config import EngineConfig
from ..runner.input_batch import step_layout
from ..runner.model_runner import ModelRunner, PreparedStep, StepHandle
from ..runtime.ops import Ops
from .sharding import Shard
from .wire import encode_step
from .worker import MAX_STEP_MESSAGE, WorkerStatus, worker_main

STOP_TIMEOUT_S = 10.0  # how long close() waits for a worker to exit before killing it
DEATH_GRACE_S = 1.0  # how long a failed step waits to learn whether a worker died
log = structlog.get_logger("overlapd.parallel")


class TensorParallelError(RuntimeError):
    """The tensor-parallel group cannot go on (a worker died, or a step failed on one rank)."""


@dataclass(slots=True)
class _Worker:
    rank: int
    proc: BaseProcess
    conn: Connection
    status: WorkerStatus | None = None  # its last message (ready, or why it failed)


class TensorParallel:
    def __init__(self, cfg: EngineConfig, ops: Ops) -> None:
        import torch

        from .group import cpu_threads, init_group, open_store

        self.size = cfg.tensor_parallel_size
        self.shard = Shard(0, self.size)
        self._threads = torch.get_num_threads()
        self._lock = threading.Lock()
        self._read_lock = threading.Lock()
        self._broken: TensorParallelError | None = None
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._on_failure: Callable[[TensorParallelError], None] | None = None
        self._layout: list[tuple[str, int, int]] = []
        self.steps = 0
        ctx = multiprocessing.get_context("spawn")
        store = open_store(self.size)
        cfg_json = msgspec.json.encode(cfg)
        self._workers: list[_Worker] = []
        try:
            for rank in range(1, self.size):
                ours, theirs = ctx.Pipe(duplex=True)
                proc = ctx.Process(target=worker_main, args=(cfg_json, rank, self.size, store.port, theirs),
                                   name=f"overlapd-tp-rank{rank}", daemon=True)
                proc.start()
                theirs.close()
                self._workers.append(_Worker(rank, proc, ours))
            log.info("tensor_parallel_starting", size=self.size, backend=_backend(cfg.device),
                     worker_pids=[w.proc.pid for w in self._workers])
            cpu_threads(cfg.device, self.size)
            group = self._until_workers_fail(lambda: init_group(store, 0, self.size, cfg.device), "joining")
            ops.use_process_group(group)  # type: ignore[attr-defined]
        except BaseException:
            self._stop_workers(0.0)
            torch.set_num_threads(self._threads)
            raise

    @property
    def worker_pids(self) -> list[int]:
        return [w.proc.pid for w in self._workers if w.proc.pid is not None]

    # --- start-up ---------------------------------------------------------------
    def attach(self, runner: ModelRunner) -> None:
        """Waits for every worker's shard and runner, then sends steps from `runner`'s launches."""
        for w in self._workers:
            ready = wait([w.conn, w.proc.sentinel])
            status = self._status(w) if w.conn in ready else None
            if status is None or status.error:
                raise TensorParallelError(self._death_text(w, status, "while loading its shard"))
            if status.num_blocks != runner.num_blocks:
                raise TensorParallelError(f"tensor-parallel rank {w.rank} has {status.num_blocks} KV blocks, "
                                          f"rank 0 {runner.num_blocks}")
        self._layout = step_layout(runner.limits)
        runner.parallel = self
        log.info("tensor_parallel_ready", size=self.size, worker_pids=self.worker_pids)

    def _until_workers_fail(self, fn: Callable[[], object], what: str):  # -> fn's result
        """fn() on a helper thread, raising at once if a worker exits meanwhile
        (a collective rendezvous would otherwise wait out its timeout)."""
        result: list[object] = []
        error: list[BaseException] = []

        def run() -> None:
            try:
                result.append(fn())
            except BaseException as exc:  # noqa: BLE001 - re-raised on the caller's thread
                error.append(exc)

        t = threading.Thread(target=run, name="overlapd-tp-join", daemon=True)
        t.start()
        while t.is_alive():
            t.join(0.05)
            for w in self._workers:
                if not w.proc.is_alive():
                    raise TensorParallelError(self._death_text(w, self._status(w), f"while {what}"))
        if error:
            raise error[0]
        return result[0]

    # --- steps (the execute thread) ----------------------------------------------
    def launch(self, prepared: PreparedStep, run: Callable[[PreparedStep], StepHandle]) -> StepHandle:
        if self._broken is not None:
            raise self._broken
        assert prepared.buf is not None
        data = encode_step(prepared.buf, prepared.counts, prepared.step_id, prepared.any_random,
                           prepared.num_logprobs, self._layout)
        try:
            if len(data) > MAX_STEP_MESSAGE:
                raise TensorParallelError(f"a step message of {len(data)} bytes exceeds {MAX_STEP_MESSAGE}")
            for w in self._workers:
                w.conn.send_bytes(data)
            handle = run(prepared)
        except BaseException as exc:
            # Some ranks may be inside this step's collectives and others not:
            # no later step could pair them up again.
            self._fail(self._cause(exc))
            raise
        self.steps += 1
        return handle

    # --- supervision (the event loop) ----------------------------------------------
    def watch(self, loop: asyncio.AbstractEventLoop, on_failure: Callable[[TensorParallelError], None]) -> None:
        """Calls `on_failure` on `loop` once, when the group breaks (a worker's exit included)."""
        self._loop, self._on_failure = loop, on_failure
        for w in self._workers:
            loop.add_reader(w.proc.sentinel, self._worker_exited, w)
        if self._broken is not None:
            loop.call_soon(on_failure, self._broken)

    def _worker_exited(self, w: _Worker) -> None:
        assert self._loop is not None
        self._loop.remove_reader(w.proc.sentinel)
        if not self._closed:
            self._fail(TensorParallelError(self._death_text(w, self._status(w), "while serving")))

    def _cause(self, exc: BaseException) -> TensorParallelError:
        """What broke a step here: a worker's death where one died (a collective
        fails the moment its peer's sockets close, just before the sentinel
        says why), else the error itself."""
        ended = wait([w.proc.sentinel for w in self._workers], timeout=DEATH_GRACE_S)
        for w in self._workers:
            if w.proc.sentinel in ended:
                return TensorParallelError(self._death_text(w, self._status(w), "while serving"))
        return TensorParallelError(f"a tensor-parallel step failed on rank 0: {exc!r}")

    def _fail(self, exc: TensorParallelError) -> None:
        """Any thread: the first failure breaks the group and reaches `on_failure`."""
        with self._lock:
            if self._broken is not None or self._closed:
                return
            self._broken = exc
        log.error("tensor_parallel_failed", error=str(exc))
        if self._loop is not None and self._on_failure is not None:
            self._loop.call_soon_threadsafe(self._on_failure, exc)

    @property
    def broken(self) -> TensorParallelError | None:
        return self._broken

    def _status(self, w: _Worker) -> WorkerStatus | None:
        """The worker's last word, if it sent one (the loop and the execute thread may both ask)."""
        with self._read_lock:
            try:
                while w.conn.poll(0):
                    w.status = msgspec.msgpack.decode(w.conn.recv_bytes(1 << 16), type=WorkerStatus)
            except (OSError, EOFError, msgspec.DecodeError):
                pass
            return w.status

    def _death_text(self, w: _Worker, status: WorkerStatus | None, when: str) -> str:
        deadline = time.monotonic() + 1.0
        while w.proc.exitcode is None and time.monotonic() < deadline:  # closed fds come just before the exit code
            w.proc.join(0.05)
        code = w.proc.exitcode
        how = "is still running" if code is None else \
            f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
        why = f" ({status.error})" if status is not None and status.error else ""
        return f"tensor-parallel worker rank {w.rank} (pid {w.proc.pid}) {how} {when}{why}"

    # --- shutdown -------------------------------------------------------------------
    def close(self) -> None:
        """Stops the workers (their connections' end is the order) and leaves the group.
        Call it once no step is being launched."""
        if self._closed:
            return
        self._closed = True
        if self._loop is not None and not self._loop.is_closed():
            for w in self._workers:
                self._loop.remove_reader(w.proc.sentinel)
        self._stop_workers(STOP_TIMEOUT_S)
        if self._broken is None:
            # Not after a failure: a thread may still sit in a collective of this group.
            from .group import destroy_group

            destroy_group()
        import torch

        torch.set_num_threads(self._threads)
        log.info("tensor_parallel_stopped", steps=self.steps)

    def _stop_workers(self, timeout: float) -> None:
        for w in self._workers:
            w.conn.close()
        deadline = time.monotonic() + timeout
        for w in self._workers:
            w.proc.join(max(0.0, deadline - time.monotonic()))
            if w.proc.is_alive():
                log.warning("tensor_parallel_worker_killed", rank=w.rank, pid=w.proc.pid)
                w.proc.kill()
                w.proc.join(5.0)


def _backend(device: str) -> str:
    from .group import backend_for

    return backend_for(device)


__all__ = ["TensorParallel", "TensorParallelError"]
