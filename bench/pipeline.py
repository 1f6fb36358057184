"""Pipeline benchmark: overlap vs --no-overlap, same requests, same run.

Runs the real pipeline in-process (the stages, the runner, the ring) on the
embedded tiny model or a dummy-weight shape, with N concurrent greedy requests
that ignore EOS, and reports per-stage milliseconds per step, the step interval,
the host overhead per step, and output tokens/s. It also checks that both modes
produced identical tokens.

    python bench/pipeline.py                         # tiny model, 16 requests x 64 tokens
    python bench/pipeline.py --model llama-3.2-1b --load-format dummy --requests 4 --max-tokens 16
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time

from overlapd.daemon.engine_api import GenerateParams
from overlapd.daemon.sinks import CollectSink
from overlapd.stages.engine.config import EngineConfig
from overlapd.stages.pipeline import Pipeline
from overlapd.stages.pipeline_config import PipelineConfig, RingConfig

from model_args import add_model_args, model_fields


async def run_mode(engine_cfg: EngineConfig, overlap: bool, args: argparse.Namespace) -> tuple[dict, list[list[int]], float]:
    ring = RingConfig(path=os.path.join(tempfile.gettempdir(), f"overlapd-bench-{os.getpid()}.ring"))
    p = Pipeline(engine_cfg, PipelineConfig(overlap=overlap), ring)
    await p.start()
    loop = asyncio.get_running_loop()
    # Warm-up: one short request, so first-call costs stay out of the figures.
    warm = CollectSink(loop)
    p.submit(GenerateParams(prompt_ids=[1, 2, 3], max_tokens=4, temperature=0.0, ignore_eos=True), warm)
    await warm.done
    p.times.__init__()
    sinks = [CollectSink(loop) for _ in range(args.requests)]
    t0 = time.perf_counter()
    for i, sink in enumerate(sinks):
        prompt = [(7 * i + j) % 200 + 3 for j in range(args.prompt_len)]
        p.submit(GenerateParams(prompt_ids=prompt, max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True), sink)
    await asyncio.gather(*(s.done for s in sinks))
    elapsed = time.perf_counter() - t0
    stats = p.stats()
    await p.drain(timeout=5)
    os.unlink(ring.path)
    return stats, [s.tokens for s in sinks], elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    args = ap.parse_args()
    cfg = EngineConfig(
        **model_fields(args),
        max_num_seqs=max(args.requests, 1), max_model_len=args.prompt_len + args.max_tokens + 16,
    )
    import uvloop

    results = {}
    for overlap in (False, True):
        results[overlap] = uvloop.run(run_mode(cfg, overlap, args))
    (s_sync, tok_sync, t_sync), (s_ovl, tok_ovl, t_ovl) = results[False], results[True]
    n_tokens = sum(len(t) for t in tok_ovl)
    print(f"\nmodel={args.model} runtime={args.runtime} device={args.device} requests={args.requests} "
          f"prompt={args.prompt_len} max_tokens={args.max_tokens}")
    print(f"{'per step (ms)':<22} {'--no-overlap':>13} {'overlap':>10}")
    for key in ("preprocess_ms", "launch_ms", "wait_ms", "postprocess_ms", "emit_ms", "host_overhead_ms", "step_interval_ms"):
        print(f"{key:<22} {s_sync[key]:>13.3f} {s_ovl[key]:>10.3f}")
    print(f"{'steps':<22} {s_sync['steps']:>13} {s_ovl['steps']:>10}")
    print(f"{'output tokens/s':<22} {n_tokens / t_sync:>13.1f} {n_tokens / t_ovl:>10.1f}")
    print(f"overlap speed-up: {t_sync / t_ovl:.2f}x   identical tokens in both modes: {tok_sync == tok_ovl}")


if __name__ == "__main__":
    main()
