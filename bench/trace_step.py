"""One decode step's kernels from a Chrome trace of bench/gpu.py (`--profile-trace`).

A step is the span after one lm_head product up to the next (the step's
kernel named like `--head` that runs at least `--min-us`); prints its
kernels in order with their durations, the idle time before each, and how
much later each ends than the one before it (with programmatic dependent
launch a kernel starts before its predecessor ends, so durations overlap
and that last column is what each adds to the step), then totals.
`--median` prints, for every position in the step, the median of that last
column over all whole steps of the trace instead.

    python bench/trace_step.py docs/gpu/2026-12-03-h200-1b-profile_b1.trace.json.gz --step 5
    python bench/trace_step.py docs/gpu/2026-12-03-h200-1b-fused-products-profile_b1.trace.json.gz \
        --head _gemv_kernel --min-us 80 --median
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics

KINDS = {"kernel", "gpu_memcpy", "gpu_memset"}


def _steps(ev: list[dict], head: str, min_us: float) -> list[list[dict]]:
    heads = [i for i, e in enumerate(ev) if head in e["name"] and e["dur"] >= min_us]
    return [ev[a + 1: b + 1] for a, b in zip(heads, heads[1:])]


def _end_increments(step: list[dict]) -> list[float]:
    ends = [e["ts"] + e["dur"] for e in step]
    return [ends[0] - step[0]["ts"]] + [b - a for a, b in zip(ends, ends[1:])]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("trace")
    ap.add_argument("--step", type=int, default=5, help="which step of the window (0 = the first whole one)")
    ap.add_argument("--head", default="256x8", help="a substring of the lm_head kernel's name")
    ap.add_argument("--min-us", type=float, default=0.0, help="the lm_head kernel's least duration")
    ap.add_argument("--median", action="store_true", help="medians over every whole step, by position")
    args = ap.parse_args()
    trace = json.load(gzip.open(args.trace) if args.trace.endswith(".gz") else open(args.trace))
    ev = sorted((e for e in trace["traceEvents"] if e.get("ph") == "X" and e.get("cat") in KINDS),
                key=lambda e: e["ts"])
    steps = _steps(ev, args.head, args.min_us)
    if args.median:
        same = [s for s in steps if len(s) == len(steps[args.step])]  # steps of the same shape
        columns = list(zip(*(_end_increments(s) for s in same)))
        for e, col in zip(steps[args.step], columns):
            print(f"{e['name'][:64]:64s} ends +{statistics.median(col):7.2f} us")
        print(f"\n{len(same)} steps of {len(columns)} kernels; median step "
              f"{statistics.median(sum(c) for c in zip(*columns)):.1f} us")
        return
    if len(steps) <= args.step:
        raise SystemExit(f"{len(steps)} whole steps between kernels named like {args.head!r}: no step {args.step}")
    step = steps[args.step]
    busy = gaps = 0.0
    prev_end = None
    for e, inc in zip(step, _end_increments(step)):
        gap = e["ts"] - prev_end if prev_end is not None else 0.0
        print(f"{e['name'][:64]:64s} {e['dur']:8.2f} us  gap {gap:6.2f}  ends +{inc:7.2f}")
        busy += e["dur"]
        gaps += gap
        prev_end = e["ts"] + e["dur"]
    span = step[-1]["ts"] + step[-1]["dur"] - step[0]["ts"]
    print(f"\n{len(step)} kernels, busy {busy:.1f} us, gaps {gaps:.1f} us, span {span:.1f} us")


if __name__ == "__main__":
    main()
