"""The protocol test engine: a real, deterministic `Engine` with no model.

It echoes the prompt back: `prompt_ids` as they are, a text `prompt` as its
UTF-8 bytes (token id = byte value, so incremental decoding is exercised).
One token per request per step; a step runs every asyncio tick (or every
`tick_s` seconds). The end of the prompt ends with `eos`, a token in
`stop_token_ids` with `stop`, `max_tokens` before either with `length`,
`abort` with `aborted`. With `capacity` requests running it answers
`overloaded` (capacity 0: always full); a prompt longer than `context_len`
is `invalid_request`. It exists to test the socket server, the client
library and the CLI against SPEC section 2 without a model; keep it.

    python -m overlapd.daemon.echo_engine --socket /tmp/x.sock [--tick-s 0.01]
"""

from __future__ import annotations

import argparse
import asyncio
import codecs
import itertools
import signal
import sys
from dataclasses import dataclass, field

import uvloop

from overlapd.stages.model.chat_template import ChatTemplate

from .config import ServerConfig
from .engine_api import EngineError, GenerateParams, RequestSink, TokenLogprob
from .server import SocketServer
from .socket_setup import SocketSetupError
from .systemd_notify import Notifier, inherited_unix_listener


@dataclass
class _Request:
    request_id: int
    sink: RequestSink
    tokens: list[int]
    params: GenerateParams
    sent: int = 0
    aborted: bool = False
    decoder: codecs.IncrementalDecoder = field(default_factory=lambda: codecs.getincrementaldecoder("utf-8")("replace"))


class EchoEngine:
    """Echoes prompts as tokens; see the module docstring for its rules."""

    def __init__(self, *, capacity: int = 1024, context_len: int = 1 << 20, tick_s: float = 0.0) -> None:
        self.model_name = "echo"
        self.capacity = capacity
        self.context_len = context_len
        self.tick_s = tick_s
        self._live: dict[int, _Request] = {}
        self._ids = itertools.count(1)
        self._wake = asyncio.Event()
        self._draining = False
        self._task: asyncio.Task[None] | None = None
        self._counts = dict.fromkeys(
            ("requests", "finished", "aborted", "rejected", "tokens", "steps"), 0
        )

    # -- Engine protocol
    @property
    def draining(self) -> bool:
        return self._draining

    def submit(self, params: GenerateParams, sink: RequestSink) -> int:
        if self._draining:
            self._counts["rejected"] += 1
            raise EngineError("shutting_down", "The engine is draining; retry once the daemon is back.")
        if len(self._live) >= self.capacity:
            self._counts["rejected"] += 1
            raise EngineError("overloaded", f"All {self.capacity} engine slots are busy; retry shortly.")
        field_name = "prompt_ids" if params.prompt_ids is not None else "prompt"
        tokens = params.prompt_ids if params.prompt_ids is not None else list((params.prompt or "").encode())
        if len(tokens) > self.context_len:
            self._counts["rejected"] += 1
            raise EngineError(
                "invalid_request",
                f"`{field_name}` is {len(tokens)} tokens but the context holds {self.context_len}; shorten it.",
            )
        request_id = next(self._ids)
        self._live[request_id] = _Request(request_id, sink, list(tokens), params)
        self._counts["requests"] += 1
        self._wake.set()
        return request_id

    def abort(self, request_id: int) -> None:
        req = self._live.get(request_id)
        if req is not None:
            req.aborted = True
            self._wake.set()

    def stats(self) -> dict[str, int | float]:
        return {**self._counts, "running": len(self._live), "capacity": self.capacity}

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        return ChatTemplate(None).render(messages)  # the plain template: this engine has no model

    def token_texts(self, token_ids: list[int]) -> list[str]:
        # Token id = byte value; a lone byte of a multi-byte character has no text of its own.
        return [bytes([t]).decode("utf-8", "replace") if t < 256 else f"<{t}>" for t in token_ids]

    # -- lifecycle
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="echo-engine")
        self._task.add_done_callback(_report_crash)

    def begin_drain(self) -> None:
        self._draining = True

    async def stop(self) -> None:
        """Abort what is left (each gets on_done('aborted')) and stop stepping."""
        for req in self._live.values():
            req.aborted = True
        self._wake.set()
        while self._live and self._task is not None and not self._task.done():
            await asyncio.sleep(min(self.tick_s, 0.005))
        if self._task is not None:
            self._task.cancel()

    async def _run(self) -> None:
        while True:
            if not self._live:
                self._wake.clear()
                await self._wake.wait()
            self._step()
            await asyncio.sleep(self.tick_s)

    def _step(self) -> None:
        self._counts["steps"] += 1
        for req in list(self._live.values()):
            reason = self._advance(req)
            if reason is not None:
                del self._live[req.request_id]
                self._counts["aborted" if reason == "aborted" else "finished"] += 1
                req.sink.on_done(reason, len(req.tokens), req.sent)

    def _advance(self, req: _Request) -> str | None:
        """Emit one token; return the finish reason once the request is over."""
        if req.aborted:
            return "aborted"
        token = req.tokens[req.sent]
        req.sent += 1
        self._counts["tokens"] += 1
        if token < 256:
            text = req.decoder.decode(bytes([token]))
        else:
            text = req.decoder.decode(b"", final=True) + f"<{token}>"
            req.decoder.reset()
        logprobs = None
        if req.params.logprobs:
            top = [(token, 0.0)] + [(token + i, -float(i)) for i in range(1, req.params.logprobs)]
            logprobs = [TokenLogprob(token_id=token, logprob=0.0, rank=1, top=top)]
        req.sink.on_tokens([token], text, logprobs)
        # Like a real engine, the step that emits the last token also ends the request.
        if token in req.params.stop_token_ids:
            return "stop"
        if req.sent >= len(req.tokens):
            return "eos"
        if req.sent >= req.params.max_tokens:
            return "length"
        return None


def _report_crash(task: asyncio.Task[None]) -> None:
    # A dead step loop would leave a daemon that accepts and never answers:
    # make it loud rather than silent.
    if not task.cancelled() and task.exception() is not None:
        print(f"echo_engine: step loop died: {task.exception()!r}", file=sys.stderr)


# ---------------------------------------------------------------- entry point


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m overlapd.daemon.echo_engine", description=__doc__.split("\n\n")[0])
    p.add_argument("--socket", help="socket path (default: the inherited systemd socket, else [server] default)")
    p.add_argument("--tick-s", type=float, default=0.0, help="seconds between steps (0: every loop tick)")
    p.add_argument("--capacity", type=int, default=1024, help="running requests before `overloaded` (0: always full)")
    p.add_argument("--context-len", type=int, default=1 << 20)
    p.add_argument("--socket-mode", default="0660")
    p.add_argument("--socket-group")
    p.add_argument("--allow-uid", type=int, action="append", dest="allowed_uids")
    p.add_argument("--max-frame-bytes", type=int, default=1 << 20)
    p.add_argument("--write-buffer-cap", type=int, default=4 << 20)
    p.add_argument("--max-live-per-connection", type=int, default=256)
    p.add_argument("--max-live-total", type=int, default=4096)
    p.add_argument("--max-connections", type=int, default=1024)
    p.add_argument("--drain-timeout-s", type=float, default=20.0)
    return p.parse_args(argv)


async def _serve(args: argparse.Namespace) -> int:
    listen_sock = None if args.socket else inherited_unix_listener()
    kwargs = {"socket_path": args.socket} if args.socket else {}
    config = ServerConfig(
        **kwargs,
        socket_mode=args.socket_mode,
        socket_group=args.socket_group,
        allowed_uids=args.allowed_uids,
        max_frame_bytes=args.max_frame_bytes,
        write_buffer_cap=args.write_buffer_cap,
        max_live_per_connection=args.max_live_per_connection,
        max_live_total=args.max_live_total,
        max_connections=args.max_connections,
        drain_timeout_s=args.drain_timeout_s,
    )
    engine = EchoEngine(capacity=args.capacity, context_len=args.context_len, tick_s=args.tick_s)
    server = SocketServer(engine, config, listen_sock=listen_sock)
    try:
        await server.start()
    except SocketSetupError as exc:
        print(f"echo_engine: {exc}", file=sys.stderr)
        return 1
    engine.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # READY only once SIGTERM is handled: a stop right after it must drain, not kill.
    notifier = Notifier()
    notifier.ready(f"echo engine on {server.address}")
    await stop.wait()
    notifier.stopping("draining")
    engine.begin_drain()
    await server.drain(config.drain_timeout_s)
    await engine.stop()
    await server.close()
    notifier.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    try:
        return uvloop.run(_serve(args))
    except ValueError as exc:  # ServerConfig rejected a flag
        print(f"echo_engine: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
