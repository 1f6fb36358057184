"""`overlapd bench --http URL`: the same load as the socket bench, through the OpenAI-compatible API.

Each client streams `POST /v1/completions` (server-sent events) with the same
token-id prompts, max_tokens and ignore_eos as the socket clients, over its
own keep-alive connection. Tokens are counted from the final usage chunk; a
chunk that carries several tokens (a client that fell behind gets them
merged) counts as one gap in the time between tokens.
"""

from __future__ import annotations

import argparse
import asyncio
import time
import msgspec

from .bench import RequestTimer, Totals  # bench imports this module only when --http is given

_decode = msgspec.json.Decoder()


async def http_client(
    args: argparse.Namespace, queue: asyncio.Queue[list[int]], totals: Totals, started: float, progress
) -> None:
    import aiohttp

    url = args.http.rstrip("/") + "/v1/completions"
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    timeout = aiohttp.ClientTimeout(total=None, sock_read=600)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1), timeout=timeout, headers=headers) as s:
        while True:
            try:
                prompt_ids = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            body = {
                "prompt": prompt_ids, "max_tokens": args.max_tokens, "temperature": args.temperature,
                "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True},
            }
            timer = RequestTimer(totals)
            async with s.post(url, json=body) as resp:
                if resp.status != 200:
                    totals.error(f"http_{resp.status}")
                    await resp.read()
                    continue
                async for line in resp.content:
                    if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                        continue
                    event = _decode.decode(line[6:])
                    now = time.perf_counter()
                    if "error" in event:
                        totals.error(str(event["error"].get("code")))
                    elif event.get("usage"):
                        totals.tokens += event["usage"]["completion_tokens"]
                        timer.done(now)
                    elif event["choices"] and event["choices"][0]["text"]:
                        timer.tokens(now)
            progress(totals, args.requests, started)
