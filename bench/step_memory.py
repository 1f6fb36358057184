"""RSS over engine steps, in-process: does anything grow without bound? (issue 15, item 5)

Runs the real pipeline (four stages, execute thread; no socket server, no
ring) or the synchronous `LLMEngine` on the tiny model: rounds of 8
concurrent requests of 48 tokens, with `--logprobs` candidates each, until
`--steps` steps ran. RSS is sampled after every round; the figure is the
least-squares growth per 1,000 steps after the first round (warm-up).

    python bench/step_memory.py --logprobs 20 --steps 12500
    MALLOC_ARENA_MAX=1 python bench/step_memory.py --logprobs 20 --steps 12500
    python bench/step_memory.py --logprobs 20 --steps 12500 --trim        # malloc_trim(0) before each sample
    python bench/step_memory.py --logprobs 20 --steps 3000 --tracemalloc  # Python allocations that grew

With `--trim`, RSS is read after glibc hands its free memory back: growth
that survives it is memory in use, growth that does not was free memory the
allocator kept.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import gc
import json
import os
import statistics
import time
import tracemalloc

from overlapd.daemon.engine_api import GenerateParams
from overlapd.daemon.sinks import CollectSink
from overlapd.stages.engine.config import EngineConfig
from overlapd.stages.engine.llm_engine import LLMEngine
from overlapd.stages.pipeline import Pipeline
from overlapd.stages.pipeline_config import PipelineConfig, RingConfig
from overlapd.stages.step_types import SamplingParams

ROWS = 8
MAX_TOKENS = 48


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


_libc = ctypes.CDLL("libc.so.6")


_first_snapshot: list[tracemalloc.Snapshot] = []


def sample(trim: bool) -> int:
    gc.collect()
    if trim:
        _libc.malloc_trim(0)
    if tracemalloc.is_tracing() and not _first_snapshot:  # after the warm-up round
        _first_snapshot.append(tracemalloc.take_snapshot())
    return rss_kib()


def params(i: int, logprobs: int) -> SamplingParams:
    return SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0 if i % 2 else 0.8, seed=i, logprobs=logprobs,
                          ignore_eos=True)


def run_engine(args: argparse.Namespace, cfg: EngineConfig) -> list[tuple[int, int]]:
    eng = LLMEngine(cfg, overlap=True)
    points = []
    r = 0
    while not points or points[-1][0] < args.steps:
        eng.generate([f"steady {r} {i}" for i in range(ROWS)], [params(i, args.logprobs) for i in range(ROWS)])
        points.append((eng.scheduler.last_step_id, sample(args.trim)))
        r += 1
    return points


async def run_pipeline(args: argparse.Namespace, cfg: EngineConfig) -> list[tuple[int, int]]:
    p = Pipeline(cfg, PipelineConfig(), RingConfig(enabled=False))
    await p.start()
    loop = asyncio.get_running_loop()
    points = []
    r = 0
    while not points or points[-1][0] < args.steps:
        sinks = [CollectSink(loop) for _ in range(ROWS)]
        for i, sink in enumerate(sinks):
            sp = params(i, args.logprobs)
            p.submit(GenerateParams(prompt=f"steady {r} {i}", max_tokens=sp.max_tokens, temperature=sp.temperature,
                                    seed=sp.seed, logprobs=sp.logprobs, ignore_eos=True), sink)
        await asyncio.gather(*(s.done for s in sinks))
        await asyncio.sleep(0.01)
        points.append((int(p.stats()["steps"]), sample(args.trim)))
        r += 1
    await p.drain(timeout=5)
    return points


def slope_kib_per_1000(points: list[tuple[int, int]]) -> float:
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return 1000 * sum((x - mx) * (y - my) for x, y in points) / max(1e-9, sum((x - mx) ** 2 for x in xs))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=["pipeline", "engine"], default="pipeline")
    ap.add_argument("--logprobs", type=int, default=20)
    ap.add_argument("--steps", type=int, default=12_500)
    ap.add_argument("--trim", action="store_true", help="malloc_trim(0) before every RSS sample")
    ap.add_argument("--tracemalloc", action="store_true", help="print the Python allocations that grew most")
    ap.add_argument("--no-prefix-cache", action="store_true")
    args = ap.parse_args()
    cfg = EngineConfig(model="tiny", max_num_seqs=ROWS, prefix_cache=not args.no_prefix_cache)
    if args.tracemalloc:
        tracemalloc.start(8)
    t0 = time.monotonic()
    if args.mode == "engine":
        points = run_engine(args, cfg)
    else:
        import uvloop

        points = uvloop.run(run_pipeline(args, cfg))
    warm, measured = points[0], points[1:]
    out = {
        "mode": args.mode, "logprobs": args.logprobs, "trim": args.trim,
        "malloc_arena_max": os.environ.get("MALLOC_ARENA_MAX"), "prefix_cache": not args.no_prefix_cache,
        "steps": measured[-1][0] - warm[0], "rss_kib_first": measured[0][1], "rss_kib_last": measured[-1][1],
        "rss_kib_max": max(p[1] for p in measured),
        "growth_kib_per_1000_steps": round(slope_kib_per_1000(measured), 1),
        # a bounded warm-up flattens out: compare the halves
        "first_half_kib_per_1000": round(slope_kib_per_1000(measured[: len(measured) // 2]), 1),
        "second_half_kib_per_1000": round(slope_kib_per_1000(measured[len(measured) // 2:]), 1),
        "rss_kib_quarters": [measured[min(len(measured) - 1, q * len(measured) // 4)][1] for q in range(5)],
        "seconds": round(time.monotonic() - t0, 1),
    }
    print(json.dumps(out))
    if args.tracemalloc:  # Python allocations alive at the end that were not after the warm-up
        diff = tracemalloc.take_snapshot().compare_to(_first_snapshot[0], "lineno")
        print(f"  Python allocations, net change since the warm-up: {sum(d.size_diff for d in diff) / 1024:+.1f} KiB")
        for d in diff[:8]:
            print(f"  {d.size_diff / 1024:+8.1f} KiB  {d.count_diff:+6d} blocks  {d.traceback[0]}")


if __name__ == "__main__":
    main()
