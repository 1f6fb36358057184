"""Host time of one decode step at many rows, with the model's time left out.

    python bench/host_step.py [--rows 64] [--steps 150]

Drives the real engine (tiny model, Torch runtime on the CPU; overlap: step N+1
is launched before step N is collected) and times only the host phases the
pipeline runs on its event loop for every step: `schedule` (scheduler),
`prepare` (staging the step's inputs) and `process` (stop checks, detokenizing,
ring rows). Prints the median of each. The model's forward is excluded, so the
figure is the per-row Python that bounds a GPU step (docs/benchmarks.md, GPU).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
from overlapd.stages.engine.config import EngineConfig
from overlapd.stages.engine.llm_engine import LLMEngine
from overlapd.stages.step_types import SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--steps", type=int, default=150)
    args = ap.parse_args()
    eng = LLMEngine(EngineConfig(model="tiny", runtime="torch", max_num_seqs=args.rows, max_num_batched_tokens=4096),
                    overlap=True)
    rng = np.random.default_rng(0)
    params = SamplingParams(temperature=0.0, max_tokens=args.steps + 50, ignore_eos=True)
    for i in range(args.rows):
        eng.add_request([int(t) for t in rng.integers(3, 700, 32)], params, req_id=i + 1)
    for _ in range(3):  # prefill, then every row decodes
        eng.step()
    times: dict[str, list[float]] = {"schedule": [], "prepare": [], "process": []}

    def timed(name: str, fn):
        def run(*a):
            t0 = time.perf_counter()
            try:
                return fn(*a)
            finally:
                times[name].append(time.perf_counter() - t0)
        return run

    eng.scheduler.schedule = timed("schedule", eng.scheduler.schedule)
    eng.runner.prepare = timed("prepare", eng.runner.prepare)
    eng.output_processor.process = timed("process", eng.output_processor.process)
    for _ in range(args.steps):
        eng.step()
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    print(f"{args.rows} decode rows, median ms per step: "
          + ", ".join(f"{k} {v:.3f}" for k, v in med.items()) + f"; total {sum(med.values()):.3f}")


if __name__ == "__main__":
    main()
