"""`overlapd serve`: the daemon. Pipeline + socket server + ring, under systemd or not.

Start-up order matters: signal handlers first (a SIGTERM right after READY=1
must drain, not kill), then the pipeline (loads the model, opens the ring),
then the socket, then READY=1. On SIGTERM: STOPPING=1, refuse new requests,
let live ones finish up to the drain timeout, abort the rest (each still gets
its frame), write the ring's last record with a negated step id and the
clean-close flag, exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import signal
import sys
import threading

from overlapd.daemon.engine_options import add_engine_arguments

# After a pipeline failure, how long the orderly shutdown may take before the
# process exits anyway: a thread that never returns (a device wait, a
# collective whose peer died) must not keep a failed daemon from restarting.
FAILED_EXIT_S = 5.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="TOML file with [server], [engine], [pipeline], [ring] and [http] tables")
    parser.add_argument("--socket", metavar="PATH", help="unix socket path (default: [server] socket_path)")
    parser.add_argument("--ring", metavar="PATH", help="ring file (default: [ring] path, /dev/shm/overlapd.ring)")
    parser.add_argument("--no-ring", action="store_true", help="do not publish steps to a shared-memory ring")
    parser.add_argument("--ring-backpressure", action="store_true", help="never overwrite what a registered reader has not read")
    parser.add_argument("--http", metavar="HOST:PORT",
                        help="also serve the OpenAI-compatible HTTP API here (a bare PORT binds 127.0.0.1)")
    parser.add_argument("--api-key-file", metavar="FILE", help="HTTP API bearer tokens, one a line (default: no keys)")
    parser.add_argument("--drain-timeout", type=float, metavar="S", help="seconds live requests get to finish on SIGTERM")
    parser.add_argument("--log-file", metavar="FILE", help="JSON logs to FILE (reopened on SIGHUP) instead of stdout")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    add_engine_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from overlapd.daemon.daemon_config import ConfigError, load_daemon_config

    try:
        cfg = load_daemon_config(args)
    except (ConfigError, ValueError) as exc:
        print(f"overlapd serve: {exc}", file=sys.stderr)
        return 2
    import uvloop

    return uvloop.run(_serve(cfg, args))


async def _serve(cfg, args: argparse.Namespace) -> int:  # cfg: DaemonConfig
    import structlog
    from overlapd.daemon.logs import configure_logging
    from overlapd.daemon.server import SocketServer
    from overlapd.daemon.socket_setup import SocketSetupError
    from overlapd.daemon.systemd_notify import (
        Notifier,
        inherited_listeners,
        watchdog_interval,
        watchdog_loop,
    )
    from overlapd.stages.pipeline import Pipeline

    logs = configure_logging(args.log_file, args.log_level)
    log = structlog.get_logger("overlapd.serve")
    loop = asyncio.get_running_loop()
    notifier = Notifier()
    stop = asyncio.Event()

    def install_signal_handlers() -> None:
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        loop.add_signal_handler(signal.SIGHUP, logs.reopen)

    install_signal_handlers()

    # Loading a large model outlasts the watchdog: keep pinging while we start.
    wd_interval = watchdog_interval()
    pipeline: Pipeline | None = None
    server: SocketServer | None = None
    http = None  # HttpServer, when the HTTP API is on
    wd_task = None
    if wd_interval:
        wd_task = loop.create_task(
            watchdog_loop(notifier, wd_interval, lambda: pipeline is None or pipeline.failed is None)
        )
    notifier.status("loading the model")
    log.info("starting", model=cfg.engine.model, runtime=cfg.engine.runtime, overlap=cfg.pipeline.overlap,
             speculative=cfg.engine.speculative, num_speculative_tokens=cfg.engine.num_speculative_tokens)
    try:
        # Model loading is blocking work; run it off the loop so the watchdog keeps ticking.
        pipeline = await loop.run_in_executor(None, Pipeline, cfg.engine, cfg.pipeline, cfg.ring)
        # Frameworks install their own fatal-signal handlers on import (Paddle
        # turns SIGTERM into an abort): ours must win, or SIGTERM cannot drain.
        install_signal_handlers()
        await pipeline.start()
        inherited = inherited_listeners()
        server = SocketServer(pipeline, cfg.server, listen_sock=inherited.unix)
        await server.start()
        if cfg.http.listen is not None or inherited.http is not None:
            from overlapd.daemon.http.server import HttpServer

            http = HttpServer(pipeline, cfg.http, stats=server.stats, listen_sock=inherited.http)
            await http.start()
    # RuntimeError: a runtime that cannot load, a tensor-parallel rank that cannot start
    except (SocketSetupError, OSError, ValueError, RuntimeError) as exc:
        log.error("start_failed", error=str(exc))
        print(f"overlapd serve: {exc}", file=sys.stderr)
        if server is not None:
            await server.close()
        if pipeline is not None:
            await pipeline.drain(timeout=0)
        return 1
    # Everything built so far (model, tables, modules) lives as long as the
    # process: keep it out of the collector's scans, which otherwise run
    # inside the step loop (one H100 run, batch 64: 20.6k -> 22.0k tokens/s).
    gc.collect()
    gc.freeze()
    where = server.address + (f" and http://{http.address}" if http is not None else "")
    notifier.ready(f"serving {cfg.engine.model} on {where}")
    log.info("ready", socket=server.address, ring=cfg.ring.path if cfg.ring.enabled else None,
             http=http.address if http is not None else None)

    failed = loop.create_task(pipeline.failure.wait())
    stopping = loop.create_task(stop.wait())
    await asyncio.wait({failed, stopping}, return_when=asyncio.FIRST_COMPLETED)
    code = 0
    if failed.done() and pipeline.failed is not None:
        log.error("pipeline_failed", error=repr(pipeline.failed))
        code = 1
        _exit_after(FAILED_EXIT_S, code)
    failed.cancel()
    stopping.cancel()

    notifier.stopping("draining")
    log.info("draining", live=server.live_requests, timeout_s=cfg.server.drain_timeout_s)
    # After a pipeline failure nothing live can progress: abort at once
    # instead of waiting out the drain timeout.
    drain_s = 0 if code else cfg.server.drain_timeout_s
    # Both front ends drain at once, on [server] drain_timeout_s.
    await asyncio.gather(server.drain(drain_s), *([http.drain(drain_s)] if http is not None else []))
    await pipeline.drain(timeout=0)  # anything still live was aborted above; closes the ring
    await server.close()
    if http is not None:
        await http.close()
    if wd_task is not None:
        wd_task.cancel()
    if pipeline.engine.spec is not None:  # proposed, accepted, acceptance rate, tokens per verify row
        log.info("speculative_stats", method=cfg.engine.speculative, **pipeline.engine.spec.stats.snapshot())
    log.info("stopped", exit_code=code)
    return code


def _exit_after(seconds: float, code: int) -> None:
    """Ends the process with `code` in `seconds` if it has not ended by then."""

    def exit_now() -> None:
        import structlog

        structlog.get_logger("overlapd.serve").error("forced_exit", exit_code=code, after_s=seconds)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)

    timer = threading.Timer(seconds, exit_now)
    timer.daemon = True
    timer.start()
