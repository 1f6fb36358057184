"""Sampled verify rows keep the target distribution (the tiny model, the real runner, CPU).

A verify row [t, d1, d2] samples each column with the request's parameters
and that output's seed state and accepts a draft when the column drew it
(stages/spec/verify.py). Over many seeds: the first emitted token follows the
target's top-k distribution (chi-square), d1 is accepted at the rate p(d1),
the second column's token given an accepted d1 follows the target's next
distribution, and every seed emits exactly what a plain decode row draws.
"""

from __future__ import annotations

import numpy as np

from engine_test_support import make_runner, tiny_cache, tiny_loaded  # noqa: F401
from overlapd.stages.step_types import SamplingParams, ScheduledRow, SchedulerOutput

TOP_K = 5
SEEDS = 2400
ROWS = 8  # verify rows a step (max_num_seqs)
CHI2_DF4_P001 = 18.47  # the chi-square critical value for 4 degrees of freedom at p = 0.001
PROMPT = [17, 300, 41, 5, 77, 612, 63, 8, 250, 4, 130, 9]


def _runner(loaded):
    return make_runner(loaded, speculative="ngram", num_speculative_tokens=2)


class Steps:
    """Hand-made steps on one runner: every row reuses the prompt's blocks (the
    same tokens write the same keys), each with a request id of its own."""

    def __init__(self, runner) -> None:
        self.runner = runner
        self.blocks = list(range(-(-(len(PROMPT) + 3) // 4)))
        self.step = 0
        self.live: list[int] = []
        self.next_id = 1

    def run(self, rows: list[tuple[list[int], int, int, SamplingParams, int, int]]):
        """rows: (tokens, start, output_index, params, seed, drafts) -> the step's output."""
        self.step += 1
        ids = list(range(self.next_id, self.next_id + len(rows)))
        self.next_id += len(rows)
        sched = [ScheduledRow(rid, toks, start, False, True, oi, self.blocks, sp, seed, num_drafts=d)
                 for rid, (toks, start, oi, sp, seed, d) in zip(ids, rows)]
        out = self.runner.execute(SchedulerOutput(self.step, sched, freed_req_ids=self.live))
        self.live = ids
        return out


def _top_k_probs(out, row: int) -> dict[int, float]:
    """The raw distribution's top-k renormalised (temperature 1): what top_k sampling draws from."""
    ids = out.top_ids[row, :TOP_K].tolist()
    lp = out.logprobs[row, 1: TOP_K + 1].astype(np.float64)
    p = np.exp(lp - lp.max())
    return dict(zip(ids, (p / p.sum()).tolist()))


def _chi_square(counts: dict[int, int], probs: dict[int, float]) -> float:
    n = sum(counts.values())
    assert set(counts) <= set(probs), f"drew outside the top-{TOP_K}: {set(counts) - set(probs)}"
    return sum((counts.get(t, 0) - n * p) ** 2 / (n * p) for t, p in probs.items())


def test_rejection_sampling_keeps_the_target_distribution(tiny_loaded):
    steps = Steps(_runner(tiny_loaded))
    greedy_lp = SamplingParams(temperature=0.0, logprobs=20)
    sampled = SamplingParams(temperature=1.0, top_k=TOP_K)
    steps.run([(PROMPT, 0, 0, greedy_lp, 0, 0)])  # the prompt's keys
    t = PROMPT[0]
    p0 = _top_k_probs(steps.run([([t], len(PROMPT), 0, greedy_lp, 0, 0)]), 0)
    ranked = sorted(p0, key=p0.get, reverse=True)
    d1 = ranked[1]  # the second most likely: accepted often, rejected often
    p1 = _top_k_probs(steps.run([([t, d1], len(PROMPT), 0, greedy_lp, 0, 0)]), 0)
    d2 = max(p1, key=p1.get)

    first: dict[int, int] = {}
    second: dict[int, int] = {}
    accepted = 0
    emitted: list[list[int]] = []
    for base in range(0, SEEDS, ROWS):
        out = steps.run([([t, d1, d2], len(PROMPT), 0, sampled, seed, 2) for seed in range(base, base + ROWS)])
        for i in range(ROWS):
            n = int(out.accept_num[i])
            toks = out.spec_tokens[i, :n].tolist()
            emitted.append(toks)
            first[toks[0]] = first.get(toks[0], 0) + 1
            assert (toks[0] == d1) == (n > 1)  # a draft is accepted exactly when its column drew it
            if n > 1:
                accepted += 1
                second[toks[1]] = second.get(toks[1], 0) + 1

    assert _chi_square(first, p0) < CHI2_DF4_P001, (first, p0)
    rate, p = accepted / SEEDS, p0[d1]
    assert abs(rate - p) < 4 * np.sqrt(p * (1 - p) / SEEDS), (rate, p)
    assert accepted > 200 and _chi_square(second, p1) < CHI2_DF4_P001, (second, p1)

    # the coupling behind it: each seed's tokens are what plain decode rows draw
    for base in range(0, 64, ROWS):
        seeds = range(base, base + ROWS)
        plain0 = steps.run([([t], len(PROMPT), 0, sampled, s, 0) for s in seeds]).sampled.tolist()
        plain1 = steps.run([([t, d1], len(PROMPT), 1, sampled, s, 0) for s in seeds]).sampled.tolist()
        for i, s in enumerate(seeds):
            assert emitted[s][0] == plain0[i]
            if len(emitted[s]) > 1:
                assert emitted[s][1] == plain1[i]
