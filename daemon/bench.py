"""`overlapd bench`: drive a running daemon with N concurrent clients.

Each client sends its requests one after another over its own connection;
the command prints a progress bar on stderr and, at the end, throughput and
latency percentiles: time to first token, time between tokens, and the whole
request.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

BAR_WIDTH = 30


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--socket", metavar="PATH", help="daemon socket (default: as the client library finds it)")
    parser.add_argument("--http", metavar="URL", help="drive the OpenAI-compatible HTTP API at URL (e.g. http://127.0.0.1:8000) instead of the socket")
    parser.add_argument("--api-key", metavar="KEY", help="with --http: the bearer token, when the daemon asks for one")
    parser.add_argument("--clients", type=int, default=8, help="concurrent connections (default 8)")
    parser.add_argument("--requests", type=int, default=64, help="requests in all (default 64)")
    parser.add_argument("--prompt-len", type=int, default=32, help="prompt tokens per request (default 32)")
    parser.add_argument("--max-tokens", type=int, default=64, help="output tokens per request (default 64)")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON object instead of a table")


@dataclass
class Totals:
    done: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    tokens: int = 0
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)
    e2e: list[float] = field(default_factory=list)

    def error(self, code: str) -> None:
        self.errors[code] = self.errors.get(code, 0) + 1


class RequestTimer:
    """One request's timestamps into Totals: its first token (TTFT), the gaps after, its end."""

    def __init__(self, totals: Totals) -> None:
        self.totals = totals
        self.t0 = self.last = time.perf_counter()
        self.first = True

    def tokens(self, now: float) -> None:
        if self.first:
            self.totals.ttft.append(now - self.t0)
            self.first = False
        else:
            self.totals.itl.append(now - self.last)
        self.last = now

    def done(self, now: float) -> None:
        self.totals.done += 1
        self.totals.e2e.append(now - self.t0)


def _progress(totals: Totals, n: int, started: float) -> None:
    frac = (totals.done + sum(totals.errors.values())) / n
    filled = int(BAR_WIDTH * frac)
    rate = totals.tokens / max(time.perf_counter() - started, 1e-9)
    sys.stderr.write(f"\r[{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {frac:6.1%}  {rate:8.1f} tok/s")
    sys.stderr.flush()


async def _client(args: argparse.Namespace, queue: asyncio.Queue[list[int]], totals: Totals, started: float) -> None:
    from overlapd.daemon.client import AsyncClient
    from overlapd.daemon.protocol import DoneFrame, ErrorFrame, TokensFrame

    async with await AsyncClient.connect(args.socket) as client:
        while True:
            try:
                prompt_ids = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            timer = RequestTimer(totals)
            async for event in await client.generate(
                prompt_ids=prompt_ids, max_tokens=args.max_tokens, temperature=args.temperature, ignore_eos=True
            ):
                now = time.perf_counter()
                if isinstance(event, TokensFrame):
                    timer.tokens(now)
                    totals.tokens += len(event.token_ids)
                elif isinstance(event, DoneFrame):
                    timer.done(now)
                elif isinstance(event, ErrorFrame):
                    totals.error(event.code)
            _progress(totals, args.requests, started)


def _pct(values: list[float]) -> str:
    if not values:
        return "-"
    p50, p90, p99 = np.percentile(np.asarray(values) * 1e3, [50, 90, 99])
    return f"{p50:9.2f} {p90:9.2f} {p99:9.2f}"


async def _bench(args: argparse.Namespace) -> int:
    from overlapd.daemon.client import ClientError

    queue: asyncio.Queue[list[int]] = asyncio.Queue()
    for i in range(args.requests):
        queue.put_nowait([(31 * i + j) % 250 + 3 for j in range(args.prompt_len)])
    totals = Totals()
    before = await _engine_stats(args)
    started = time.perf_counter()
    if args.http:
        from overlapd.daemon.bench_http import http_client

        clients = [http_client(args, queue, totals, started, _progress) for _ in range(max(1, args.clients))]
    else:
        clients = [_client(args, queue, totals, started) for _ in range(max(1, args.clients))]
    try:
        await asyncio.gather(*clients)
    except (ClientError, OSError) as exc:
        print(f"\noverlapd bench: {exc}", file=sys.stderr)
        return 1
    elapsed = time.perf_counter() - started
    sys.stderr.write("\n")
    summary: dict[str, Any] = {
        "requests": totals.done,
        "errors": totals.errors,
        "elapsed_s": elapsed,
        "requests_per_s": totals.done / elapsed,
        "output_tokens_per_s": totals.tokens / elapsed,
    }
    after = await _engine_stats(args)
    if before is not None and after is not None:
        summary.update(_step_figures(before, after))
    if args.json:
        import msgspec

        for name, values in (("ttft", totals.ttft), ("itl", totals.itl), ("e2e", totals.e2e)):
            if values:
                p50, p90, p99 = np.percentile(np.asarray(values) * 1e3, [50, 90, 99])
                summary[f"{name}_ms"] = {"p50": float(p50), "p90": float(p90), "p99": float(p99)}
        print(msgspec.json.encode(summary).decode())
        return 0 if not totals.errors else 1
    print(f"requests {totals.done} ok, errors {totals.errors or 'none'}, {elapsed:.2f} s")
    print(f"throughput {summary['requests_per_s']:.2f} req/s, {summary['output_tokens_per_s']:.1f} output tok/s")
    print(f"{'latency (ms)':<26} {'p50':>9} {'p90':>9} {'p99':>9}")
    print(f"{'time to first token':<26} {_pct(totals.ttft)}")
    print(f"{'time between tokens':<26} {_pct(totals.itl)}")
    print(f"{'whole request':<26} {_pct(totals.e2e)}")
    if "steps" in summary:
        print(f"engine steps {summary['steps']}, {summary['tokens_per_step']:.2f} output tokens per step")
    if summary.get("spec_verify_rows"):
        print(f"speculation: {summary['spec_verify_rows']} verify rows, {summary['spec_tokens_per_verify_row']:.2f} "
              f"tokens per verify row, {summary['spec_acceptance_rate']:.0%} of drafts accepted")
    return 0 if not totals.errors else 1


async def _engine_stats(args: argparse.Namespace) -> dict[str, int | float] | None:
    """The daemon's counters over its socket (None where only --http was given)."""
    if args.http and not args.socket:
        return None
    from overlapd.daemon.client_async import AsyncClient

    async with await AsyncClient.connect(args.socket) as client:
        return await client.stats()


def _step_figures(before: dict[str, int | float], after: dict[str, int | float]) -> dict[str, int | float]:
    """Steps and tokens per step over the run (other clients' work counts too), and,
    when the daemon speculates, what its verify rows gained."""
    d = {k: after.get(k, 0) - before.get(k, 0) for k in after if isinstance(after[k], (int, float))}
    steps = int(d.get("steps", 0))
    out: dict[str, int | float] = {"steps": steps, "tokens_per_step": d.get("tokens", 0) / steps if steps else 0.0}
    rows = int(d.get("spec_verify_rows", 0))
    if rows:
        proposed = d.get("spec_proposed", 0)
        out.update(spec_verify_rows=rows, spec_tokens_per_verify_row=d.get("spec_emitted", 0) / rows,
                   spec_acceptance_rate=d.get("spec_accepted", 0) / proposed if proposed else 0.0)
    return out


def run(args: argparse.Namespace) -> int:
    if args.clients < 1 or args.requests < 1 or args.prompt_len < 1 or args.max_tokens < 1:
        print("overlapd bench: --clients, --requests, --prompt-len and --max-tokens must be >= 1", file=sys.stderr)
        return 2
    import uvloop

    return uvloop.run(_bench(args))
