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
from overlapd.stages.model_runner import ModelRunner  # noqa: E402
from overlapd.stages.runtime import load_runtime  # noqa: E402
from overlapd.stages.step_types import SamplingParams  # noqa: E402

PROMPTS = [[7, 5, 9, 17, 33], [0, 370, 321], [0, 5, 77, 123, 300, 410, 9], [0, 12]]


class FakeGraph:
    def __init__(self, ops, fn) -> None:
        self.ops, self.fn = ops, fn
        self.output = fn()

    def replay(self) -> None:
        new = self.fn()
        for name in ("sampled", "ints"):
            self.ops.copy_(getattr(self.output, name), getattr(new, name))


def run(ops, loaded, graphs: bool, overlapped: bool):
    cfg = engine_config(runtime="torch", block_size=4)
    runner = ModelRunner(loaded, ops, cfg, 128)
    if graphs:
        runner.enable_graphs(lambda fn: FakeGraph(ops, fn))
    d = Driver(runner, token_budget=16)
    reqs = [d.add(Req(i + 1, p, SamplingParams(temperature=0.0, max_tokens=40 - 3 * i))) for i, p in enumerate(PROMPTS)]
    d.run_overlapped() if overlapped else d.run()
    return [r.outputs for r in reqs], runner.graphs


def main() -> None:
    os.environ["OVERLAPD_CACHE_DIR"] = tempfile.mkdtemp()
    ops = load_runtime("torch", "cpu")
    loaded = load_model(engine_config(runtime="torch", block_size=4), ops)
    eager, _ = run(ops, loaded, False, True)
    replayed, g = run(ops, loaded, True, True)
    replayed_sync, _ = run(ops, loaded, True, False)
    print(json.dumps({
        "same_overlapped": replayed == eager, "same_sync": replayed_sync == eager,
        "captures": g.captures, "replays": g.replays, "row_buckets": sorted({k[0] for k in g._graphs}),
        "block_buckets": sorted({k[1] for k in g._graphs}),
    }))


if __name__ == "__main__":
    main()
