"""Runs the engine's execute side on the Torch runtime; prints one JSON line.

Used by test_runtime_torch.py in a subprocess, so torch and paddle never share
a process. Never imports paddle.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(__file__))

from engine_test_support import Driver, Req, engine_config, reference_greedy_tokens, tiny_in_memory  # noqa: E402
from overlapd.stages.model.loader import load_model  # noqa: E402
from overlapd.stages.model.reference import log_softmax, reference_logits  # noqa: E402
from overlapd.stages.runner.model_runner import ModelRunner  # noqa: E402
from overlapd.stages.runtime import load_runtime  # noqa: E402
from overlapd.stages.step_types import SamplingParams  # noqa: E402

PROMPTS = [[0, 424, 13, 314, 338, 15], [0, 370, 321, 301], [0, 5, 77, 123, 300, 410, 9, 66, 701, 12, 44, 99, 250, 3]]


def main() -> None:
    os.environ["OVERLAPD_CACHE_DIR"] = tempfile.mkdtemp()
    ops = load_runtime("torch", "cpu")
    loaded = load_model(engine_config(), ops)

    def runner() -> ModelRunner:
        return ModelRunner(loaded, ops, engine_config(), 128)

    # greedy, mixed batch with chunked prefill
    d = Driver(runner(), token_budget=7)
    greedy = [d.add(Req(i + 1, p, SamplingParams(temperature=0.0, max_tokens=8, logprobs=3)))
              for i, p in enumerate(PROMPTS)]
    d.run()
    greedy_ok = all(r.outputs == reference_greedy_tokens(r.prompt, 8) for r in greedy)
    # one request alone: its decode steps are one token (the fused-products path where the ops have it)
    d = Driver(runner())
    one = d.add(Req(9, PROMPTS[2], SamplingParams(temperature=0.0, max_tokens=8)))
    d.run()
    greedy_one_ok = one.outputs == reference_greedy_tokens(one.prompt, 8)
    config, weights, _ = tiny_in_memory()
    ref = log_softmax(reference_logits(config, weights, greedy[0].prompt)[-1])
    lp_err = float(abs(greedy[0].logprob_rows[0][0][0] - ref[greedy[0].outputs[0]]))

    # seeded sampling: alone vs in a batch, and overlap vs sync
    params = SamplingParams(temperature=0.9, top_p=0.9, top_k=50, max_tokens=12)
    alone = Req(1, PROMPTS[0], params, seed=7)
    d = Driver(runner())
    d.add(alone)
    d.run()
    batched = Req(1, PROMPTS[0], params, seed=7)
    d = Driver(runner())
    for i, p in enumerate(PROMPTS[1:] * 3):
        d.add(Req(10 + i, p, SamplingParams(temperature=1.0, max_tokens=10), seed=i))
    d.add(batched)
    d.run_overlapped()
    print(json.dumps({
        "greedy_ok": greedy_ok,
        "greedy_one_ok": greedy_one_ok,
        "logprob_err": lp_err,
        "seeded_same": batched.outputs == alone.outputs,
        "distinct": len(set(alone.outputs)),
        "fused": ops._fused is not None,
        "fused_products": getattr(ops, "fused_products", None) is not None,
    }))


if __name__ == "__main__":
    main()
