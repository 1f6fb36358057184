"""Host cost of the ngram method's proposals per decode step: token lists vs
the planner's per-request `TokenHistory`.

Every step the planner proposes drafts for each speculating row from the
request's known tokens. The baseline turns `prompt + outputs` into an array
each time (what the planner did before); the history appends the step's new
outputs to an array it keeps. Both search the same window with the same code,
so their proposals are equal (checked here on every call). Each step adds 1-5
outputs per row, as a verify row emits.

    python bench/ngram_proposer.py                 # 32 rows, contexts 128 .. 16,384
    python bench/ngram_proposer.py --rows 64 --steps 100
"""

from __future__ import annotations

import argparse
import random
import time

from overlapd.stages.spec.ngram import TokenHistory, propose_ngram

K, NGRAM_MAX, NGRAM_MIN = 4, 4, 1


def run(rows: int, context: int, steps: int, seed: int) -> tuple[float, float]:
    """(us per step with lists, us per step with histories) for `rows` rows."""
    rng = random.Random(seed)
    # a small alphabet, so matches exist and the search does its full work
    prompts = [[rng.randrange(64) for _ in range(context)] for _ in range(rows)]
    outputs: list[list[int]] = [[] for _ in range(rows)]
    histories = [TokenHistory(p) for p in prompts]
    spent = [0.0, 0.0]
    for _ in range(steps):
        for r in range(rows):
            outputs[r].extend(rng.randrange(64) for _ in range(rng.randrange(1, 6)))
        t0 = time.perf_counter()
        from_lists = [propose_ngram(prompts[r] + outputs[r], K, NGRAM_MAX, NGRAM_MIN) for r in range(rows)]
        t1 = time.perf_counter()
        from_histories = [propose_ngram(histories[r].tokens(outputs[r]), K, NGRAM_MAX, NGRAM_MIN)
                          for r in range(rows)]
        t2 = time.perf_counter()
        assert from_lists == from_histories
        spent[0] += t1 - t0
        spent[1] += t2 - t1
    return spent[0] / steps * 1e6, spent[1] / steps * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--contexts", default="128,1024,4096,16384")
    args = ap.parse_args()
    print(f"ngram proposals for {args.rows} rows per step (k={K}, n={NGRAM_MIN}..{NGRAM_MAX}), "
          f"mean of {args.steps} steps")
    print(f"{'context':>8} {'lists us/step':>14} {'history us/step':>16} {'lists / history':>16}")
    for context in (int(c) for c in args.contexts.split(",")):
        lists, history = run(args.rows, context, args.steps, seed=context)
        print(f"{context:>8} {lists:>14.0f} {history:>16.0f} {lists / history:>15.1f}x")


if __name__ == "__main__":
    main()
