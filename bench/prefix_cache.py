"""Prefix caching benchmark: multi-turn chat with the cache on vs off, same run.

Every conversation starts with the same system prompt; each turn resends the
whole history (system prompt, earlier questions and answers) plus a new
question, as chat clients do. All conversations run at once, each sending
its next turn when the previous answer is complete. The real pipeline runs
in-process (the four stages, the runner, no ring), once with the prefix
cache off and once on. Reported per mode: time to first token (p50, p99) of
turn 1 and of turns 2..N, the prompt tokens actually computed, the cache's
hit rate, and whether both modes gave the same tokens (greedy, so they must).

    python bench/prefix_cache.py                                  # tiny model, CPU, the issue's shape
    python bench/prefix_cache.py --conversations 8 --system-len 500  # smaller, for a busy 2-core host
    python bench/prefix_cache.py --model llama-3.2-1b --load-format dummy --runtime torch \\
        --device gpu --dtype bfloat16                               # GPU
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from dataclasses import dataclass

from overlapd.daemon.engine_api import GenerateParams
from overlapd.daemon.sinks import CollectSink
from overlapd.stages.engine.config import EngineConfig
from overlapd.stages.pipeline import Pipeline
from overlapd.stages.pipeline_config import PipelineConfig, RingConfig

from model_args import add_model_args, model_fields


class TimedSink(CollectSink):
    """Records when the first tokens arrived."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        self.submitted = time.perf_counter()
        self.first: float | None = None

    def on_tokens(self, token_ids, text, logprobs) -> None:  # type: ignore[no-untyped-def]
        if self.first is None and token_ids:
            self.first = time.perf_counter()
        super().on_tokens(token_ids, text, logprobs)


@dataclass
class ModeResult:
    ttft_s: dict[int, list[float]]  # turn -> TTFT of every conversation's turn
    answers: list[list[list[int]]]  # conversation -> turn -> tokens
    stats: dict
    seconds: float


def token_ids(n: int, seed: int, vocab: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, vocab) for _ in range(n)]  # clear of the first (special) ids


async def conversation(p: Pipeline, c: int, args: argparse.Namespace, system: list[int], vocab: int,
                       ttft: dict[int, list[float]]) -> list[list[int]]:
    loop = asyncio.get_running_loop()
    history = list(system)
    answers = []
    for turn in range(1, args.turns + 1):
        prompt = history + token_ids(args.user_len, seed=1000 * c + turn, vocab=vocab)
        sink = TimedSink(loop)
        p.submit(GenerateParams(prompt_ids=prompt, max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True), sink)
        await sink.done
        assert sink.first is not None
        ttft[turn].append(sink.first - sink.submitted)
        answers.append(sink.tokens)
        history = prompt + sink.tokens
    return answers


async def run_mode(cfg: EngineConfig, args: argparse.Namespace) -> ModeResult:
    p = Pipeline(cfg, PipelineConfig(overlap=True), RingConfig(enabled=False))
    await p.start()
    vocab = p.engine.vocab_size
    warm = CollectSink(asyncio.get_running_loop())  # first-call costs out of the figures; shares no prefix
    p.submit(GenerateParams(prompt_ids=token_ids(40, seed=-1, vocab=vocab), max_tokens=4, temperature=0.0,
                            ignore_eos=True), warm)
    await warm.done
    before = p.stats()
    system = token_ids(args.system_len, seed=0, vocab=vocab)
    ttft: dict[int, list[float]] = {t: [] for t in range(1, args.turns + 1)}
    t0 = time.perf_counter()
    answers = await asyncio.gather(*(conversation(p, c, args, system, vocab, ttft) for c in range(args.conversations)))
    seconds = time.perf_counter() - t0
    after = p.stats()
    await p.drain(timeout=5)
    stats = {k: after[k] - before[k] for k in ("prompt_tokens_computed", "prefix_cache_queried_tokens",
                                               "prefix_cache_hit_tokens", "preemptions", "steps")}
    stats["kv_blocks_cached_end"] = after["kv_blocks_cached"]
    stats["kv_blocks_total"] = after["kv_blocks_total"]
    return ModeResult(ttft, list(answers), stats, seconds)


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap)
    ap.add_argument("--conversations", type=int, default=32)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--system-len", type=int, default=1000, help="tokens in the shared system prompt")
    ap.add_argument("--user-len", type=int, default=32, help="tokens in each new question")
    ap.add_argument("--max-tokens", type=int, default=32, help="tokens in each answer")
    ap.add_argument("--max-num-batched-tokens", type=int, default=512)
    ap.add_argument("--json", metavar="PATH", help="also write the figures here")
    args = ap.parse_args()
    longest = args.system_len + args.turns * (args.user_len + args.max_tokens)
    base = dict(**model_fields(args), max_num_seqs=args.conversations, max_num_batched_tokens=args.max_num_batched_tokens,
                max_model_len=-(-longest // 256) * 256)
    import uvloop

    results = {}
    for on in (False, True):
        results[on] = uvloop.run(run_mode(EngineConfig(**base, prefix_cache=on), args))
    off, on_ = results[False], results[True]
    later = range(2, args.turns + 1)
    print(f"\nmodel={args.model} runtime={args.runtime} device={args.device} conversations={args.conversations} "
          f"turns={args.turns} system={args.system_len} user={args.user_len} answer={args.max_tokens} "
          f"budget={args.max_num_batched_tokens}")
    print(f"{'':<34} {'cache off':>10} {'cache on':>10} {'off/on':>7}")
    figures: dict[str, dict] = {}
    rows = [
        ("TTFT p50 turn 1 (ms)", lambda r: 1e3 * statistics.median(r.ttft_s[1])),
        ("TTFT p99 turn 1 (ms)", lambda r: 1e3 * pct(r.ttft_s[1], 0.99)),
        (f"TTFT p50 turns 2-{args.turns} (ms)", lambda r: 1e3 * statistics.median([x for t in later for x in r.ttft_s[t]])),
        (f"TTFT p99 turns 2-{args.turns} (ms)", lambda r: 1e3 * pct([x for t in later for x in r.ttft_s[t]], 0.99)),
        ("prompt tokens computed", lambda r: r.stats["prompt_tokens_computed"]),
        ("prompt tokens sent", lambda r: r.stats["prefix_cache_queried_tokens"]),
        ("cache hit rate", lambda r: r.stats["prefix_cache_hit_tokens"] / max(1, r.stats["prefix_cache_queried_tokens"])),
        ("preemptions", lambda r: r.stats["preemptions"]),
        ("wall time (s)", lambda r: r.seconds),
    ]
    for name, fn in rows:
        a, b = fn(off), fn(on_)
        ratio = f"{a / b:>6.2f}x" if a and b and name != "cache hit rate" else ""
        print(f"{name:<34} {a:>10.1f} {b:>10.1f} {ratio:>7}" if isinstance(a, float) and a > 1 else
              f"{name:<34} {a:>10} {b:>10} {ratio:>7}" if isinstance(a, int) else
              f"{name:<34} {a:>10.3f} {b:>10.3f} {ratio:>7}")
        figures[name] = {"off": a, "on": b}
    same = off.answers == on_.answers
    print(f"identical tokens with the cache on and off: {same}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "figures": figures, "identical": same}, f, indent=1)
    if not same:
        raise SystemExit("the cache changed the tokens")


if __name__ == "__main__":
    main()
