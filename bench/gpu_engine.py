"""bench/gpu.py's pipeline section: the real pipeline at one batch size in
every mode (overlap, sync, probe, eager, sampled...), CUDA events around each
launch for the step period, the GPU idle gap and the device-only step."""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch

from overlapd.daemon.engine_api import GenerateParams
from overlapd.daemon.sinks import CollectSink
from overlapd.stages.engine.config import EngineConfig
from overlapd.stages.model.config import NAMED_SHAPES
from overlapd.stages.pipeline import Pipeline
from overlapd.stages.pipeline_config import PipelineConfig, RingConfig

SLEEP_CYCLES = 40_000_000  # ~20 ms at H100 clocks: longer than any step's host launch


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q)) if xs else float("nan")


@dataclass
class StepRecord:
    start: torch.cuda.Event
    end: torch.cuda.Event
    decode: bool
    probe: bool
    host_launch_s: float


@dataclass
class StepTimer:
    """Wraps runner.launch (execute thread): CUDA events around each step's device work."""

    runner: object
    probe_every: int = 0
    records: list[StepRecord] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._launch = self.runner.launch
        self.runner.launch = self.launch  # the executor looks it up on every call

    def launch(self, prepared):
        n = prepared.counts
        decode = n.num_rows > 0 and n.num_tokens == n.num_rows
        probe = bool(self.probe_every) and decode and len(self.records) % self.probe_every == 0
        if probe:
            torch.cuda._sleep(SLEEP_CYCLES)  # queue the whole step behind a busy stream
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0 = time.perf_counter()
        s.record()
        handle = self._launch(prepared)
        e.record()
        self.records.append(StepRecord(s, e, decode, probe, time.perf_counter() - t0))
        return handle

    def summary(self) -> dict[str, float]:
        torch.cuda.synchronize()
        r = self.records
        probes = [x.start.elapsed_time(x.end) for x in r if x.probe]
        gaps, periods, device = [], [], []
        for a, b in zip(r, r[1:]):
            if a.decode and b.decode and not a.probe and not b.probe:
                gaps.append(a.end.elapsed_time(b.start) * 1e3)
                periods.append(a.end.elapsed_time(b.end))
        device = [x.start.elapsed_time(x.end) for x in r if x.decode and not x.probe]
        host = [x.host_launch_s * 1e3 for x in r if x.decode]
        return {
            "decode_steps": sum(x.decode for x in r), "steps": len(r),
            "step_period_ms_p50": pct(periods, 50), "gap_us_p50": pct(gaps, 50), "gap_us_p99": pct(gaps, 99),
            "gap_us_mean": float(np.mean(gaps)) if gaps else float("nan"),
            "step_events_ms_p50": pct(device, 50), "host_launch_ms_p50": pct(host, 50),
            "device_only_ms_p50": pct(probes, 50), "probes": len(probes),
        }


def request_params(i: int, prompt: list[int], max_tokens: int, sampled: bool) -> GenerateParams:
    """Greedy, or issue 13's sampled workload: temperature 0.8, top-p 0.95, a
    seed per request, and 5 logprobs on a quarter of the requests."""
    if not sampled:
        return GenerateParams(prompt_ids=prompt, max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    return GenerateParams(prompt_ids=prompt, max_tokens=max_tokens, temperature=0.8, top_p=0.95, seed=1000 + i,
                          logprobs=5 if i % 4 == 0 else 0, ignore_eos=True)


async def _workload(p: Pipeline, requests: int, prompt_len: int, max_tokens: int, salt: int,
                    sampled: bool = False) -> list[CollectSink]:
    loop = asyncio.get_running_loop()
    sinks = [CollectSink(loop) for _ in range(requests)]
    for i, s in enumerate(sinks):
        prompt = [(7 * i + 11 * salt + j) % 30000 + 3 for j in range(prompt_len)]
        p.submit(request_params(i, prompt, max_tokens, sampled), s)
    await asyncio.gather(*(s.done for s in sinks))
    return sinks


async def pipeline_run(cfg: EngineConfig, mode: "Mode", requests: int, prompt_len: int,
                       max_tokens: int) -> tuple[dict, list[list[int]]]:
    overlap, probe_every, graphs, wake, fused = mode.overlap, mode.probe, mode.graphs, mode.wake, mode.fused
    ring = RingConfig(path=os.path.join(tempfile.gettempdir(), f"overlapd-gpu-bench-{os.getpid()}.ring"))
    os.environ["OVERLAPD_FUSED"] = "" if fused else "0"  # read when the engine's TorchOps is made
    os.environ["OVERLAPD_GEMV"] = "1" if mode.gemv else "0"
    os.environ["OVERLAPD_PDL"] = "1" if mode.pdl else "0"
    p = Pipeline(cfg, PipelineConfig(overlap=overlap, overlap_depth=mode.depth), ring)
    for name in ("OVERLAPD_FUSED", "OVERLAPD_GEMV", "OVERLAPD_PDL"):
        os.environ.pop(name)
    if not graphs:
        p.engine.runner.graphs = None
    os.environ["OVERLAPD_WAKE"] = wake  # read by the execute stage at start
    await p.start()
    # Warm-up: with graphs, the same workload once, so every (rows, context)
    # bucket is captured before the timed pass; eagerly, one short request.
    await _workload(p, requests if graphs else 1, prompt_len, max_tokens if graphs else 8, salt=1,
                    sampled=mode.sampled)
    timer = StepTimer(p.engine.runner, probe_every)
    p.times.__init__()
    if mode.gc_freeze:  # what `overlapd serve` does once it is ready
        gc.collect()
        gc.freeze()
    g = p.engine.runner.graphs
    captures_before = g.captures if g is not None else 0
    t0 = time.perf_counter()
    sinks = await _workload(p, requests, prompt_len, max_tokens, salt=0, sampled=mode.sampled)
    elapsed = time.perf_counter() - t0
    stats = p.stats()
    await p.drain(timeout=5)
    os.unlink(ring.path)
    tokens = [s.tokens for s in sinks]
    out = {"overlap": overlap, "graphs": graphs, "wake": wake, "fused": fused, "gc_freeze": mode.gc_freeze,
           "sampled": mode.sampled, "gemv": mode.gemv, "pdl": mode.pdl,
           "depth": mode.depth,
           "elapsed_s": elapsed,
           "graph_captures": (g.captures if g is not None else 0), "timed_captures": (g.captures - captures_before
                                                                                      if g is not None else 0), "tokens": sum(map(len, tokens)),
           "tokens_per_s": sum(map(len, tokens)) / elapsed, "probe_every": probe_every,
           **{k: stats[k] for k in ("preprocess_ms", "launch_ms", "wait_ms", "postprocess_ms", "emit_ms",
                                    "step_interval_ms") if k in stats},
           **timer.summary()}
    del p
    if mode.gc_freeze:
        gc.unfreeze()
    torch.cuda.empty_cache()
    return out, tokens


def engine_bench(args: argparse.Namespace, requests: int, max_tokens: int) -> dict:
    cfg = EngineConfig(model=args.model, load_format="dummy", runtime="torch", device="gpu", dtype="bfloat16",
                       max_num_seqs=max(requests, 1), max_num_batched_tokens=args.max_batched_tokens,
                       max_model_len=args.prompt_len + args.max_tokens + 16,
                       kv_cache_bytes=kv_cache_bytes(args, requests))
    res = {}
    toks = {}
    for mode in MODES:
        name = mode.name
        if args.modes and name not in args.modes.split(","):
            continue
        res[name], toks[name] = asyncio.run(pipeline_run(cfg, mode, requests, args.prompt_len, max_tokens))
        print(f"  batch {requests} {name}: {res[name]['tokens_per_s']:.0f} tok/s", flush=True)
    # bfloat16 rounds differently without the fused kernels, so near-ties may flip there
    greedy = {n: t for n, t in toks.items() if not res[n]["sampled"] and res[n]["gemv"]}
    ref = next((t for n, t in greedy.items() if res[n]["fused"]), None)
    res["identical_tokens"] = all(t == ref for n, t in greedy.items() if res[n]["fused"])
    same = [a == b for n, t in greedy.items() if not res[n]["fused"] for a, b in zip(t, ref or [])]
    res["unfused_same_requests"] = sum(same) / len(same) if same else float("nan")
    # cuBLAS sums the batch-1 products in another order than kernels/triton_gemv.py: bf16 near-ties may flip
    same = [a == b for n, t in toks.items() if not res[n]["gemv"] for a, b in zip(t, ref or [])]
    res["cublas_same_requests"] = sum(same) / len(same) if same else float("nan")
    # seeded sampling: the same tokens from graphs and eager, overlap and sync
    sampled = [t for n, t in toks.items() if res[n]["sampled"]]
    res["sampled_identical_tokens"] = all(t == sampled[0] for t in sampled) if sampled else None
    res["sampled_modes"] = [n for n in toks if res[n]["sampled"]]
    return res


def kv_cache_bytes(args: argparse.Namespace, requests: int) -> int:
    """8 GiB, or what `requests` full-length sequences need with a quarter spare."""
    c = NAMED_SHAPES.get(args.model)
    if c is None:
        return 8 << 30
    per_token = 2 * c.num_hidden_layers * c.kv_size * 2  # keys and values, bf16
    return max(8 << 30, int(requests * (args.prompt_len + args.max_tokens + 32) * per_token * 1.25))


class Mode(NamedTuple):
    name: str
    overlap: bool
    probe: int  # queue a sleep before every n-th decode step (device-only timing); 0 = never
    graphs: bool = True  # CUDA graphs for decode
    wake: str = "spin"  # completion wake-up: the native spin thread or the CUDA host function
    fused: bool = True  # the Triton decode kernels
    gc_freeze: bool = False  # gc.freeze() before the timed pass, as `overlapd serve` does
    depth: int = 2  # PipelineConfig.overlap_depth: steps in flight with overlap
    sampled: bool = False  # issue 13's sampled workload (request_params) instead of greedy
    gemv: bool = True  # one-token steps through kernels/triton_gemv.py (False: cuBLAS, OVERLAPD_GEMV=0)
    pdl: bool = True  # programmatic dependent launch where the GPU has it (False: OVERLAPD_PDL=0)


MODES = (Mode("sync", False, 0, wake="hostfunc"), Mode("overlap", True, 0, wake="hostfunc"),
         Mode("overlap_spin", True, 0), Mode("overlap_spin_gc", True, 0, gc_freeze=True),
         Mode("depth3", True, 0, gc_freeze=True, depth=3),
         Mode("probe", True, 8, wake="hostfunc"),
         Mode("unfused", True, 0, fused=False), Mode("unfused_probe", True, 8, wake="hostfunc", fused=False),
         Mode("sync_eager", False, 0, graphs=False, wake="hostfunc"),
         Mode("overlap_eager", True, 0, graphs=False, wake="hostfunc"),
         Mode("depth3_sampled", True, 0, gc_freeze=True, depth=3, sampled=True),
         Mode("sync_sampled", False, 0, wake="hostfunc", sampled=True),
         Mode("probe_sampled", True, 8, wake="hostfunc", sampled=True),
         Mode("sampled_eager", True, 0, graphs=False, depth=3, sampled=True),
         Mode("depth3_cublas", True, 0, gc_freeze=True, depth=3, gemv=False),
         Mode("probe_cublas", True, 8, wake="hostfunc", gemv=False),
         Mode("depth3_nopdl", True, 0, gc_freeze=True, depth=3, pdl=False),
         Mode("probe_nopdl", True, 8, wake="hostfunc", pdl=False))

