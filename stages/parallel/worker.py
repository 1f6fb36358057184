"""A tensor-parallel worker: rank r of N in a process the daemon spawned.

It loads its shard of the model, builds the same ModelRunner as rank 0 (same
limits, same number of KV blocks, its own KV heads) and then follows rank 0's
stream of steps: each message is one step's staged inputs (wire.py), launched
through the very same runner body, so every rank samples the same tokens from
the all-gathered logits and keeps its own `prev_sampled` for the next
overlapped step. The outputs stay here; only rank 0's reach the host side.

Lifetime: the step connection's end (EOF) is the order to stop; the parent's
death, seen on multiprocessing's parent sentinel, ends the process at once so
no worker outlives its daemon. Any error ends it with a nonzero code after
telling the parent why, which the daemon treats as the group's failure.
"""

from __future__ import annotations

import collections
import os
import sys
import threading
import traceback
from multiprocessing import parent_process
from multiprocessing.connection import Connection, wait

import msgspec
import structlog

# Steps a worker launches before it collects the oldest: one running, one
# queued behind it on the device, so the worker's host never waits on it.
WORKER_INFLIGHT = 2
# A bound on one step message (rank 0's are a few KiB to a few MiB).
MAX_STEP_MESSAGE = 256 << 20

log = structlog.get_logger("overlapd.parallel.worker")


class WorkerStatus(msgspec.Struct, frozen=True):
    """What a worker tells rank 0: ready (with its KV block count), or why it failed."""

    rank: int
    num_blocks: int = 0
    error: str = ""


def worker_main(cfg_json: bytes, rank: int, size: int, store_port: int, conn: Connection) -> None:
    """The spawned process's entry point."""
    _exit_with_parent()
    _log_to_stderr()
    try:
        runner = _start(cfg_json, rank, size, store_port)
    except BaseException as exc:  # noqa: BLE001 - reported to rank 0, then a nonzero exit
        _report_failure(conn, rank, "loading", exc)
        os._exit(1)
    conn.send_bytes(msgspec.msgpack.encode(WorkerStatus(rank, runner.num_blocks)))
    log.info("tensor_parallel_worker_ready", rank=rank, pid=os.getpid(), num_blocks=runner.num_blocks)
    try:
        steps = _follow(runner, conn)
    except BaseException as exc:  # noqa: BLE001
        _report_failure(conn, rank, "a step", exc)
        os._exit(1)
    from .group import destroy_group

    destroy_group()
    log.info("tensor_parallel_worker_stopped", rank=rank, steps=steps)


def _start(cfg_json: bytes, rank: int, size: int, store_port: int):  # -> ModelRunner
    from overlapd.stages.engine.config import EngineConfig
    from overlapd.stages.engine.sizing import kv_cache_num_blocks
    from overlapd.stages.model.loader import load_model
    from overlapd.stages.runner.model_runner import ModelRunner
    from overlapd.stages.runtime import load_runtime

    from .group import cpu_threads, init_group, join_store, select_device
    from .sharding import Shard

    cfg = msgspec.json.decode(cfg_json, type=EngineConfig)
    select_device(rank, cfg.device)
    cpu_threads(cfg.device, size)
    ops = load_runtime(cfg.runtime, cfg.device)
    group = init_group(join_store(store_port, size), rank, size, cfg.device)
    ops.use_process_group(group)  # type: ignore[attr-defined]
    loaded = load_model(cfg, ops, Shard(rank, size))
    return ModelRunner(loaded, ops, cfg, kv_cache_num_blocks(cfg, loaded.config), staging_depth=WORKER_INFLIGHT + 1)


def _follow(runner, conn: Connection) -> int:
    """Launch every step rank 0 sends, in order, until it closes the connection."""
    from .wire import decode_step, stage_into
    from overlapd.stages.runner.input_batch import step_layout

    layout = step_layout(runner.limits)
    pending: collections.deque = collections.deque()
    steps = 0
    while True:
        try:
            data = conn.recv_bytes(MAX_STEP_MESSAGE)
        except EOFError:
            break
        msg = decode_step(data)
        prepared = runner.prepare_staged(msg.step_id, stage_into(msg, layout), msg.any_random, msg.num_logprobs)
        pending.append(runner.launch(prepared))
        steps += 1
        if len(pending) >= WORKER_INFLIGHT:
            runner.collect(pending.popleft())  # frees its staging buffer; its outputs are rank 0's to deliver
    while pending:
        runner.collect(pending.popleft())
    return steps


def _report_failure(conn: Connection, rank: int, during: str, exc: BaseException) -> None:
    text = f"{type(exc).__name__}: {exc}"
    log.error("tensor_parallel_worker_failed", rank=rank, during=during, error=text,
              traceback="".join(traceback.format_exception(exc)))
    try:
        conn.send_bytes(msgspec.msgpack.encode(WorkerStatus(rank, error=f"{during}: {text}")))
    except OSError:
        pass  # rank 0 is gone or has stopped listening
    sys.stderr.flush()


def _log_to_stderr() -> None:
    """JSON lines, as the daemon's, but on stderr: `overlapd generate` keeps stdout
    for the generated text, and journald reads both."""
    structlog.configure(
        processors=[structlog.processors.add_log_level, structlog.processors.TimeStamper(fmt="iso", utc=True),
                    structlog.processors.format_exc_info, structlog.processors.JSONRenderer()],
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=False,
    )


def _exit_with_parent() -> None:
    """End this process as soon as the daemon's is gone, whatever this one is doing
    (waiting for a step, or inside a collective that would only time out)."""
    parent = parent_process()
    if parent is None:
        return

    def watch() -> None:
        wait([parent.sentinel])
        os._exit(0)

    threading.Thread(target=watch, name="overlapd-tp-parent-watch", daemon=True).start()
