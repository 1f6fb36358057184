"""One decode step's kernels from a Chrome trace of bench/gpu.py (`--profile-trace`).

A step is the span after one lm_head product up to the next (the largest
GEMM of the step, recognised by name); prints its kernels in order with
their durations and the idle time before each, then totals, and the
per-layer sums of the kernels between two of its products.

    python bench/trace_step.py docs/gpu/2026-12-03-h200-1b-profile_b1.trace.json.gz --step 5
"""

from __future__ import annotations

import argparse
import gzip
import json

KINDS = {"kernel", "gpu_memcpy", "gpu_memset"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("trace")
    ap.add_argument("--step", type=int, default=5, help="which step of the window (0 = the first whole one)")
    ap.add_argument("--head", default="256x8", help="a substring of the lm_head kernel's name")
    args = ap.parse_args()
    trace = json.load(gzip.open(args.trace) if args.trace.endswith(".gz") else open(args.trace))
    ev = sorted((e for e in trace["traceEvents"] if e.get("ph") == "X" and e.get("cat") in KINDS),
                key=lambda e: e["ts"])
    heads = [i for i, e in enumerate(ev) if args.head in e["name"]]
    if len(heads) < args.step + 2:
        raise SystemExit(f"{len(heads)} kernels named like {args.head!r}: no step {args.step}")
    step = ev[heads[args.step] + 1: heads[args.step + 1] + 1]
    busy = gaps = 0.0
    prev_end = None
    for e in step:
        gap = e["ts"] - prev_end if prev_end is not None else 0.0
        print(f"{e['name'][:64]:64s} {e['dur']:8.2f} us  gap {gap:5.2f}")
        busy += e["dur"]
        gaps += gap
        prev_end = e["ts"] + e["dur"]
    span = step[-1]["ts"] + step[-1]["dur"] - step[0]["ts"]
    print(f"\n{len(step)} kernels, busy {busy:.1f} us, gaps {gaps:.1f} us, span {span:.1f} us")


if __name__ == "__main__":
    main()
