"""Runs decode-graph replay with a fake capture on the Torch CPU runtime; prints one JSON line.

Used by test_decode_graphs.py in a subprocess, so torch and paddle never share
a process. The fake graph re-runs the captured body at every replay and writes
its results into the tensors the capture returned, as a CUDA graph replay
rewrites its static outputs; any input the body read from the host at capture
time (instead of from the persistent device buffers) then shows as wrong tokens.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(__file__))

from engine_test_support import Driver, Req, engine_config  # noqa: E402
from overlapd.stages.model.loader import load_model  # noqa: E402
from overlapd.stages.runner.model_runner import ModelRunner  # noqa: E402
from overlapd.stages.runtime import load_runtime  # noqa: E402
from overlapd.stages.step_types import SamplingParams  # noqa: E402

PROMPTS = [[7, 5, 9, 17, 33], [0, 370, 321], [0, 5, 77, 123, 300, 410, 9], [0, 12]]


class FakeGraph:
    def __init__(self, ops, fn) -> None:
        self.ops, self.fn = ops, fn
        self.output = fn()

    def replay(self) -> None:
        new = self.fn()
        for name in ("sampled", "ints", "logprobs"):
            if getattr(new, name) is not None:
                self.ops.copy_(getattr(self.output, name), getattr(new, name))


# Greedy, seeded sampling with each filter, and logprobs (alone and with sampling),
# in one batch: its decode steps replay one sampled graph with logprobs.
MIXED = [SamplingParams(temperature=0.0, max_tokens=30),
         SamplingParams(temperature=0.8, top_p=0.95, max_tokens=34, logprobs=3),
         SamplingParams(temperature=1.1, top_k=7, max_tokens=26),
         SamplingParams(temperature=0.0, max_tokens=22, logprobs=5),
         SamplingParams(temperature=0.7, top_p=0.5, top_k=20, max_tokens=31)]


def run(ops, loaded, graphs: bool, overlapped: bool, mixed: bool = False):
    cfg = engine_config(runtime="torch", block_size=4)
    runner = ModelRunner(loaded, ops, cfg, 128)
    if graphs:
        runner.enable_graphs(lambda fn: FakeGraph(ops, fn))
    d = Driver(runner, token_budget=16)
    if mixed:
        reqs = [d.add(Req(i + 1, PROMPTS[i % len(PROMPTS)], p, seed=1000 + i)) for i, p in enumerate(MIXED)]
    else:
        reqs = [d.add(Req(i + 1, p, SamplingParams(temperature=0.0, max_tokens=40 - 3 * i)))
                for i, p in enumerate(PROMPTS)]
    d.run_overlapped() if overlapped else d.run()
    lps = [[(lp.tolist(), ids.tolist(), rank) for lp, ids, rank in r.logprob_rows] for r in reqs]
    return [r.outputs for r in reqs], runner.graphs, lps


# Prompts that repeat themselves (prompt lookup finds drafts at once); greedy and seeded rows.
SPEC_PROMPTS = [[5, 6, 7, 8, 9] * 4 + [5, 6], list(range(3, 40)) * 2 + [3, 4], [11, 12, 13] * 5]
SPEC_PARAMS = [SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True),
               SamplingParams(temperature=0.3, top_p=0.9, max_tokens=36, seed=5, ignore_eos=True),
               SamplingParams(temperature=0.0, max_tokens=32, logprobs=2, ignore_eos=True)]


def spec_run(graphs: bool, overlap: bool) -> tuple[list[list[int]], list]:
    """Speculative decoding (ngram, k = 4): its verify steps are one-token rows, so they replay too."""
    from overlapd.stages.engine.config import EngineConfig
    from overlapd.stages.engine.llm_engine import LLMEngine
    e = LLMEngine(EngineConfig(model="tiny", runtime="torch", speculative="ngram", num_speculative_tokens=4,
                               block_size=4), overlap=overlap)
    if graphs:
        e.runner.enable_graphs(lambda fn: FakeGraph(e.runner.ops, fn))
    ids = [e.add_request(p, sp) for p, sp in zip(SPEC_PROMPTS, SPEC_PARAMS)]
    tokens: dict[int, list[int]] = {i: [] for i in ids}
    while e.has_work():
        for out in e.step():
            tokens[out.req_id] += out.new_token_ids
    keys = sorted({k[2:] for k in e.runner.graphs._graphs}) if graphs else []
    return [tokens[i] for i in ids], keys


def same_logprobs(a, b, atol: float = 1e-5) -> bool:
    if [len(x) for x in a] != [len(x) for x in b]:
        return False
    for ra, rb in zip(a, b):
        for (lp_a, ids_a, rank_a), (lp_b, ids_b, rank_b) in zip(ra, rb):
            if ids_a != ids_b or rank_a != rank_b or max(abs(x - y) for x, y in zip(lp_a, lp_b)) > atol:
                return False
    return True


def main() -> None:
    os.environ["OVERLAPD_CACHE_DIR"] = tempfile.mkdtemp()
    ops = load_runtime("torch", "cpu")
    loaded = load_model(engine_config(runtime="torch", block_size=4), ops)
    eager, _, _ = run(ops, loaded, False, True)
    replayed, g, _ = run(ops, loaded, True, True)
    replayed_sync, _, _ = run(ops, loaded, True, False)
    m_eager, _, m_eager_lp = run(ops, loaded, False, True, mixed=True)
    m_sync_eager, _, m_sync_eager_lp = run(ops, loaded, False, False, mixed=True)
    m_replayed, mg, m_lp = run(ops, loaded, True, True, mixed=True)
    m_replayed_sync, _, m_sync_lp = run(ops, loaded, True, False, mixed=True)
    s_eager, _ = spec_run(False, True)
    s_replayed, s_keys = spec_run(True, True)
    s_replayed_sync, _ = spec_run(True, False)
    print(json.dumps({
        "same_overlapped": replayed == eager, "same_sync": replayed_sync == eager,
        "captures": g.captures, "replays": g.replays, "row_buckets": sorted({k[0] for k in g._graphs}),
        "block_buckets": sorted({k[1] for k in g._graphs}),
        # tokens, candidate ids and ranks exactly; logprob values within float32
        # rounding (a replay attends over the padded context bucket: masked
        # positions add exact zeros, but the sums run in another order)
        "mixed_same_overlapped": m_replayed == m_eager and same_logprobs(m_lp, m_eager_lp),
        "mixed_same_sync": m_replayed_sync == m_eager and same_logprobs(m_sync_lp, m_eager_lp),
        "mixed_eager_overlap_is_sync": m_sync_eager == m_eager and m_sync_eager_lp == m_eager_lp,
        "mixed_keys": sorted({k[2:] for k in mg._graphs}), "mixed_replays": mg.replays,
        "mixed_logprob_rows": [len(x) for x in m_lp],
        "mixed_distinct_streams": len({tuple(t) for t in m_replayed}),
        "spec_same": s_replayed == s_eager and s_replayed_sync == s_eager, "spec_keys": s_keys,
    }))


if __name__ == "__main__":
    main()
