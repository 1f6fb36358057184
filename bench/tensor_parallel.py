"""Tensor parallelism: N = 1 against N = 2 (or --sizes) in the same run, on whatever devices exist.

For each model, batch size and tensor-parallel size: one LLMEngine (torch
runtime, overlap on) generates `--tokens` greedy tokens for `--batch` short
prompts; reported per configuration:

- step_ms: the median wall time of one engine step while every row decodes
  (LLMEngine.step, which launches step N+1 and collects step N);
- tok_s: generated tokens over the whole generate, prefill included;
- collective_ms: rank 0's time inside all-reduce / all-gather per decode step,
  and how many it made (two per layer, one for the embedding, one gather).

On the CPU (gloo) a collective returns when it is done, so the time inside it
is its cost (waiting for the slower rank included). On GPUs (NCCL) the calls
only queue work, so collectives are timed in a second pass that synchronizes
around each one, without CUDA graphs; its step time is not reported.

CPU threads: N ranks on the CPU take cores // N intra-op threads each
(stages/parallel/group.py); N = 1 runs with that many threads too
(`threads` in the output) and, with --n1-all-cores, also with every core.

    python bench/tensor_parallel.py                          # tiny, batch 1 and 8
    python bench/tensor_parallel.py --models smollm2-135m-instruct --batches 1,8
    python bench/tensor_parallel.py --device gpu --models llama-3.1-8b --load-format dummy --batches 1,64
"""

from __future__ import annotations

import argparse
import json
import os
import time
from contextlib import contextmanager
from typing import Any, Iterator

import numpy as np
import torch

from overlapd.stages.engine.config import EngineConfig
from overlapd.stages.engine.llm_engine import LLMEngine
from overlapd.stages.step_types import SamplingParams


def prompts(batch: int, length: int) -> list[list[int]]:
    """Deterministic prompts valid in every vocabulary here (ids 3..252)."""
    return [[(97 + 13 * i + 7 * j) % 250 + 3 for j in range(length)] for i in range(batch)]


@contextmanager
def timed_collectives(ops: Any, sync: bool) -> Iterator[dict[str, float]]:
    """Counts and times rank 0's collectives (this instance's methods only)."""
    acc = {"calls": 0, "seconds": 0.0}
    originals = {name: getattr(ops, name) for name in ("all_reduce_", "all_gather")}

    def wrap(fn):
        def timed(*args, **kw):
            if sync:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = fn(*args, **kw)
            if sync:
                torch.cuda.synchronize()
            acc["seconds"] += time.perf_counter() - t0
            acc["calls"] += 1
            return out
        return timed

    for name, fn in originals.items():
        setattr(ops, name, wrap(fn))
    try:
        yield acc
    finally:
        for name in originals:
            delattr(ops, name)  # the class's methods again


def run(args: argparse.Namespace, model: str, batch: int, size: int, threads: int | None,
        time_collectives: bool) -> dict[str, Any]:
    if threads is not None:
        torch.set_num_threads(threads)
    cfg = EngineConfig(model=model, load_format=args.load_format, runtime="torch", device=args.device,
                       dtype=args.dtype, tensor_parallel_size=size, max_num_seqs=max(batch, 1),
                       max_num_batched_tokens=max(batch * args.prompt_len, 64),
                       max_model_len=args.prompt_len + args.tokens + 8)
    engine = LLMEngine(cfg, overlap=True)
    try:
        threads_used = torch.get_num_threads()
        params = SamplingParams(temperature=0.0, max_tokens=args.tokens, ignore_eos=True)
        engine.generate(prompts(batch, args.prompt_len), params)  # warm-up (first-call costs, graph captures)
        for p in prompts(batch, args.prompt_len):
            engine.add_request(p, params)
        steps: list[float] = []
        sync = args.device == "gpu"
        t_start = time.perf_counter()
        with timed_collectives(engine.ops, sync) if (size > 1 and time_collectives) else _nothing() as acc:
            decode_calls = decode_s = 0.0
            while engine.has_work():
                before = dict(acc) if acc is not None else None
                t0 = time.perf_counter()
                outs = engine.step()
                dt = time.perf_counter() - t0
                so = engine.in_flight
                decoding = so is not None and all(len(r.token_ids) == 1 for r in so.rows) and len(so.rows) == batch
                if decoding:
                    steps.append(dt)
                    if acc is not None and before is not None:
                        decode_calls += acc["calls"] - before["calls"]
                        decode_s += acc["seconds"] - before["seconds"]
                del outs
        total = time.perf_counter() - t_start
        out: dict[str, Any] = {"model": model, "batch": batch, "size": size, "threads": threads_used,
                               "decode_steps": len(steps), "step_ms": round(1e3 * float(np.median(steps)), 2),
                               "tok_s": round(batch * args.tokens / total, 1)}
        if acc is not None and steps:
            out["collective_ms"] = round(1e3 * decode_s / len(steps), 2)
            out["collectives_per_step"] = round(decode_calls / len(steps), 1)
        return out
    finally:
        engine.close()


@contextmanager
def _nothing() -> Iterator[None]:
    yield None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="tiny")
    ap.add_argument("--load-format", default="auto", choices=["auto", "dummy"])
    ap.add_argument("--device", default="cpu", choices=["cpu", "gpu"])
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--sizes", default="1,2")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--n1-all-cores", action="store_true", help="also run N = 1 with every core's thread")
    args = ap.parse_args()
    cores = os.cpu_count() or 1
    sizes = [int(s) for s in args.sizes.split(",")]
    rows = []
    for model in args.models.split(","):
        for batch in (int(b) for b in args.batches.split(",")):
            for size in sizes:
                gpu = args.device == "gpu"
                threads = None if gpu else max(1, cores // max(sizes))  # every configuration alike
                if size == 1 or not gpu:
                    rows.append(run(args, model, batch, size, threads, time_collectives=True))
                else:
                    r = run(args, model, batch, size, threads, time_collectives=False)
                    os.environ["OVERLAPD_CUDA_GRAPHS"] = "0"
                    timing = run(args, model, batch, size, threads, time_collectives=True)
                    del os.environ["OVERLAPD_CUDA_GRAPHS"]
                    r.update({k: timing[k] for k in ("collective_ms", "collectives_per_step") if k in timing})
                    rows.append(r)
                print(json.dumps(rows[-1]), flush=True)
                if size == 1 and args.n1_all_cores and not gpu and cores > 1:
                    rows.append(run(args, model, batch, 1, cores, time_collectives=False))
                    print(json.dumps(rows[-1]), flush=True)
    where = f"{torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}" if args.device == "gpu" \
        else f"CPU, {cores} cores, gloo"
    print(f"\n{where}; greedy, {args.tokens} tokens after a {args.prompt_len}-token prompt per row")
    print(f"{'model':24} {'batch':>5} {'N':>2} {'thr':>3} {'step ms':>8} {'tok/s':>8} {'coll ms/step':>12} "
          f"{'coll/step':>9}")
    for r in rows:
        print(f"{r['model'][:24]:24} {r['batch']:>5} {r['size']:>2} {r['threads']:>3} {r['step_ms']:>8} "
              f"{r['tok_s']:>8} {r.get('collective_ms', '-'):>12} {r.get('collectives_per_step', '-'):>9}")


if __name__ == "__main__":
    main()
