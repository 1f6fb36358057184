"""GPU benchmark (H100): the real pipeline on the Torch runtime, every comparison in one run.

    python bench/gpu.py --out /tmp/gpu.json            # 64 x (128 prompt + 512 out), and batch 1

Sections, all in one process on one GPU:
- copy bandwidth (device-to-device, bytes read + written) and the batch-1 HBM roofline;
- handoff latency: copy -> host function -> eventfd -> loop wake-up, against a
  thread that synchronizes on an event and wakes the loop, and a native thread
  spinning on the event (OVERLAPD_WAKE=spin);
- the pipeline (four stages, runner, ring) at batch 64 and batch 1, overlap and
  --no-overlap, greedy with ignore_eos: output tokens/s; CUDA events around each
  launch give the decode step period and the GPU idle gap between consecutive
  steps; a third "probe" run blocks the stream with a sleep kernel before some
  steps so that all of a step's kernels are queued before it starts: the events
  around it then time the device work alone (device-only step time);
- Hugging Face transformers `generate` with a static cache on the same shape,
  bf16, same GPU (torch.compile off: `disable_compile=True`);
- profile (last: a profiler fault cannot cost the others' figures, and the JSON
  is written after every section anyway): torch.profiler over ~20 decode steps
  of the real engine (overlap, one thread) at batch 1 (eager, then graphs) and
  batch 64 (graphs):
  the top kernels, kernels per step, kernel time per step against the step
  period, and the GEMM/GEMV share; `--profile-trace` keeps batch 1's trace.

On the CPU, as a smoke check of the profile section's code path (CPU ops stand
in for kernels): python bench/gpu.py --device cpu --model tiny --sections profile
"""

from __future__ import annotations

import argparse
import asyncio
import faulthandler
import gc
import json
import os
import re
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from typing import NamedTuple
from typing import Any

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the bench's own modules (static_peer, ...)
from overlapd.daemon.engine_api import GenerateParams
from overlapd.daemon.sinks import CollectSink
from overlapd.kernels import cuda_handoff
from overlapd.kernels.handoff import CompletionQueue
from overlapd.stages.engine import llm_engine as engine_mod
from overlapd.stages.engine.config import EngineConfig
from overlapd.stages.model.config import NAMED_SHAPES
from overlapd.stages.pipeline import Pipeline
from overlapd.stages.pipeline_config import PipelineConfig, RingConfig
from overlapd.stages.step_types import SamplingParams

SLEEP_CYCLES = 40_000_000  # ~20 ms at H100 clocks: longer than any step's host launch


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q)) if xs else float("nan")


# --------------------------------------------------------------------------- bandwidth
def copy_bandwidth(nbytes: int = 1 << 30, reps: int = 20) -> float:
    """Bytes read + written per second by a device-to-device copy (median of reps)."""
    a = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_(0, 255)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        b.copy_(a)
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    assert torch.equal(a[:4096], b[:4096])
    return 2 * nbytes / statistics.median(times)


# --------------------------------------------------------------------------- handoff
def handoff_latency(n: int = 300) -> dict[str, float]:
    """Idle stream: issue a small device-to-host copy, measure until the loop runs on."""
    pool = cuda_handoff.PinnedCopies(slot_bytes=1 << 16, slots=4)
    x = torch.arange(64 * 22, dtype=torch.int64, device="cuda")
    stream = torch.cuda.current_stream().cuda_stream
    import concurrent.futures

    waiter = concurrent.futures.ThreadPoolExecutor(1)

    async def run() -> dict[str, list[float]]:
        loop = asyncio.get_running_loop()
        cq = CompletionQueue(loop)
        out: dict[str, list[float]] = {"hostfunc_eventfd": [], "event_sync_thread": [], "spin_thread": []}
        modes = list(out)
        spin = cuda_handoff.spin_waiter(cq.fd)
        for i in range(3 * n + 30):
            mode = modes[i % 3]
            torch.cuda.synchronize()
            await asyncio.sleep(0.0003)  # the stream and the loop are idle
            t0 = time.perf_counter_ns()
            pending = pool.copy_async(x.data_ptr(), x.numel() * 8, np.int64, tuple(x.shape), stream)
            if mode == "hostfunc_eventfd":
                fut = cq.wait()
                cuda_handoff.signal_after(stream, cq.fd)
                await fut
            elif mode == "spin_thread":
                fut = cq.wait()
                spin.watch(stream)
                await fut
            else:
                await loop.run_in_executor(waiter, pending._event.synchronize)
            t1 = time.perf_counter_ns()
            assert int(pending.result()[-1]) == x.numel() - 1
            if i >= 30:
                out[mode].append((t1 - t0) / 1e3)
        del spin
        cq.close()
        return out

    lat = asyncio.run(run())
    waiter.shutdown()
    return {f"{k}_{q}": pct(v, p) for k, v in lat.items() for q, p in (("p50_us", 50), ("p99_us", 99))}


# --------------------------------------------------------------------------- pipeline
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
    p = Pipeline(cfg, PipelineConfig(overlap=overlap, overlap_depth=mode.depth), ring)
    os.environ.pop("OVERLAPD_FUSED")
    os.environ.pop("OVERLAPD_GEMV")
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
           "sampled": mode.sampled, "gemv": mode.gemv,
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
    greedy = {n: t for n, t in toks.items() if not res[n]["sampled"] and not res[n]["gemv"]}
    ref = next((t for n, t in greedy.items() if res[n]["fused"]), None)
    res["identical_tokens"] = all(t == ref for n, t in greedy.items() if res[n]["fused"])
    same = [a == b for n, t in greedy.items() if not res[n]["fused"] for a, b in zip(t, ref or [])]
    res["unfused_same_requests"] = sum(same) / len(same) if same else float("nan")
    # the Triton GEMV sums in another order than cuBLAS: bf16 near-ties may flip
    same = [a == b for n, t in toks.items() if res[n]["gemv"] for a, b in zip(t, ref or [])]
    res["gemv_same_requests"] = sum(same) / len(same) if same else float("nan")
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
    gemv: bool = False  # batch-1 products through kernels/triton_gemv.py (OVERLAPD_GEMV=1)


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
         Mode("depth3_gemv", True, 0, gc_freeze=True, depth=3, gemv=True),
         Mode("probe_gemv", True, 8, wake="hostfunc", gemv=True))


# --------------------------------------------------------------------------- Hugging Face
def hf_bench(args: argparse.Namespace, batch: int, max_tokens: int) -> dict:
    import transformers
    from transformers import LlamaConfig as HFConfig
    from transformers import LlamaForCausalLM

    c = NAMED_SHAPES[args.model].to_hf_dict()
    c.pop("torch_dtype", None)
    hf_cfg = HFConfig(**c)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(hf_cfg).to(torch.bfloat16).eval()
    ids = torch.randint(3, 30000, (batch, args.prompt_len), device="cuda")
    kw = dict(do_sample=False, cache_implementation="static", disable_compile=True, pad_token_id=0,
              attention_mask=torch.ones_like(ids))

    def gen(n: int) -> float:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)
        torch.cuda.synchronize()
        assert out.shape[1] == args.prompt_len + n
        return time.perf_counter() - t0

    with torch.inference_mode():
        gen(8)
        short = gen(2)  # prefill + one step: subtracted to get the per-step time
        full = gen(max_tokens)
    del model
    torch.cuda.empty_cache()
    return {"transformers": transformers.__version__, "batch": batch, "tokens": batch * max_tokens,
            "elapsed_s": full, "tokens_per_s": batch * max_tokens / full,
            "step_ms": (full - short) / (max_tokens - 2) * 1e3}


# --------------------------------------------------------------------------- profile
# Kernel classes by name: cuBLAS/cuBLASLt (nvjet on Hopper, sm90_xmma, cutlass,
# gemv, splitK reduce), aten's matmuls on the CPU; attention is ours (Triton),
# SDPA's or flash's; copies are the runtime's memcpy/memset activities.
GEMM_RE = re.compile(r"gemm|gemv|nvjet|xmma|cutlass|cublas|splitk|matmul|^aten::(mm|addmm|bmm|linear)$", re.IGNORECASE)
ATTENTION_RE = re.compile(r"attention|attn|flash|fmha|sdpa|merge_partitions", re.IGNORECASE)
COPY_RE = re.compile(r"^(memcpy|memset)", re.IGNORECASE)
PROFILE_TOP = 25


def kernel_class(name: str) -> str:
    for cls, rx in (("copy", COPY_RE), ("gemm", GEMM_RE), ("attention", ATTENTION_RE)):
        if rx.search(name):
            return cls
    return "other"


@dataclass
class DecodeWindow:
    """Wraps runner.launch: profiles `steps` decode steps of the
    full batch after `skip` of them. The profiler starts and stops here, between
    two launches and after a synchronize, so the window holds exactly those
    steps' device work; a mark after every such launch gives the step period
    (CUDA events on the GPU, the host clock on the CPU where launches are synchronous)."""

    runner: Any
    rows: int
    skip: int
    steps: int
    cuda: bool
    prof: Any = None
    stopped: bool = False
    seen: int = 0
    marks: list[Any] = field(default_factory=list)
    replays: int = 0

    def __post_init__(self) -> None:
        self._launch = self.runner.launch
        self.runner.launch = self.launch  # the executor looks it up on every call

    def launch(self, prepared):
        n = prepared.counts
        full = n.num_rows == self.rows and n.num_tokens == n.num_rows
        if full and self.seen == self.skip:
            self._sync()
            # CPU too on a GPU: the trace then shows the host side (launches, waits) beside the kernels.
            acts = [torch.profiler.ProfilerActivity.CPU]
            if self.cuda:
                acts.append(torch.profiler.ProfilerActivity.CUDA)
            self.prof = torch.profiler.profile(activities=acts)
            self.prof.start()
            self.replays = -self._replays()
        elif full and self.seen == self.skip + self.steps:
            self.stop()
        handle = self._launch(prepared)
        if full:
            self.seen += 1
            self.marks.append(self._mark())
        return handle

    def stop(self) -> None:
        if self.prof is not None and not self.stopped:
            self._sync()
            self.prof.stop()
            self.stopped = True
            self.replays += self._replays()

    def _replays(self) -> int:
        g = self.runner.graphs
        return g.replays if g is not None else 0

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def _mark(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        return e

    def periods_us(self, first: int, last: int) -> list[float]:
        """Step periods between the marks of full decode steps first..last."""
        m = self.marks[first: last + 1]
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) * 1e3 for a, b in zip(m, m[1:])]
        return [(b - a) * 1e6 for a, b in zip(m, m[1:])]


def device_activities(prof: Any, cuda: bool) -> list[tuple[str, float, float]]:
    """(name, start us, end us) of the device's work: kernels, memcpy and memset
    on a GPU. On the CPU operators stand in for kernels, each over its self
    time only (a matmul's time is its own, not that of the linear around it)."""
    from torch.autograd import DeviceType

    out = []
    for e in prof.events():
        start = float(e.time_range.start)
        if cuda and e.device_type == DeviceType.CUDA:
            out.append((e.name, start, float(e.time_range.end)))
        elif not cuda and e.device_type == DeviceType.CPU and e.name.startswith("aten::"):
            out.append((e.name, start, start + float(e.self_cpu_time_total)))
    return out


def trace_activities(trace: dict) -> list[tuple[str, float, float]]:
    """The same from a Chrome trace (Kineto's categories): a second source where
    a torch version keeps device kernels out of prof.events()."""
    cats = {"kernel", "gpu_memcpy", "gpu_memset"}
    return [(e["name"], float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0)))
            for e in trace.get("traceEvents", []) if e.get("cat") in cats and e.get("ph") == "X"]


def summarize_activities(acts: list[tuple[str, float, float]], steps: int, period_us: float) -> dict:
    """Top kernels, kernels per step, kernel time per step vs the period, and shares by class."""
    by_name: dict[str, list[float]] = {}
    for name, start, end in acts:
        by_name.setdefault(name, []).append(end - start)
    total = sum(sum(v) for v in by_name.values())
    top = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:PROFILE_TOP]
    classes: dict[str, float] = {}
    counts: dict[str, int] = {}
    for name, durs in by_name.items():
        c = kernel_class(name)
        classes[c] = classes.get(c, 0.0) + sum(durs)
        counts[c] = counts.get(c, 0) + len(durs)
    # Busy time: the union of the activity intervals (streams may overlap).
    busy, end_so_far = 0.0, float("-inf")
    for start, end in sorted((a[1], a[2]) for a in acts):
        if end > end_so_far:
            busy += end - max(start, end_so_far)
            end_so_far = end
    span = (max(a[2] for a in acts) - min(a[1] for a in acts)) if acts else float("nan")
    per_step = total / steps
    return {
        "steps": steps, "activities": len(acts), "kernels_per_step": len(acts) / steps,
        "kernel_us_per_step": per_step, "busy_us_per_step": busy / steps, "span_us_per_step": span / steps,
        "step_period_us": period_us, "kernel_fraction_of_period": per_step / period_us if period_us else float("nan"),
        "share": {c: v / total for c, v in sorted(classes.items())} if total else {},
        "us_per_step_by_class": {c: v / steps for c, v in sorted(classes.items())},
        "kernels_per_step_by_class": {c: v / steps for c, v in sorted(counts.items())},
        "top": [{"name": name[:80], "class": kernel_class(name), "calls": len(d), "total_us": sum(d),
                 "us_per_step": sum(d) / steps, "share": sum(d) / total} for name, d in top],
    }


def profile_run(cfg: EngineConfig, rows: int, prompt_len: int, skip: int, steps: int, graphs: bool) -> DecodeWindow:
    """The real engine (scheduler, runner, overlap: step N+1 launched before N is
    collected) at `rows` greedy requests, stepped from this thread: the thread
    that imported torch is the one Kineto wants to start the profiler on, and
    CPU ops (the smoke check's stand-in for kernels) are recorded per thread.
    A warm-up pass captures every graph bucket the timed pass meets."""
    engine = engine_mod.LLMEngine(cfg, overlap=True)
    if not graphs:
        engine.runner.graphs = None
    vocab = engine.vocab_size
    # The first token comes from the prefill; rows whose chunked prefill ends in a
    # later step start decoding later, and a few spare decode steps.
    max_tokens = skip + steps + 4 + -(-rows * prompt_len // cfg.max_num_batched_tokens)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)

    def prompts(salt: int) -> list[list[int]]:
        return [[(7 * i + 11 * salt + j) % (vocab - 3) + 3 for j in range(prompt_len)] for i in range(rows)]

    engine.generate(prompts(1), params)
    w = DecodeWindow(engine.runner, rows, skip, steps, cfg.device == "gpu")
    try:
        results = engine.generate(prompts(0), params)
    finally:
        engine.runner.launch = w._launch
    if not w.stopped:
        w.stop()
        raise RuntimeError(f"only {w.seen} full decode steps of the {skip + steps + 1} needed")
    assert all(len(x.token_ids) == max_tokens for x in results), [len(x.token_ids) for x in results]
    return w


def profile_bench(args: argparse.Namespace, rows: int, steps: int, graphs: bool, trace_path: str = "") -> dict:
    cuda = args.device == "gpu"
    # max_model_len as engine_bench's: the same key in _load_once, so the weights load once.
    cfg = EngineConfig(model=args.model, load_format="dummy", runtime="torch", device=args.device, dtype=args.dtype,
                       max_num_seqs=rows, max_num_batched_tokens=args.max_batched_tokens,
                       max_model_len=args.prompt_len + args.max_tokens + 16, kv_cache_bytes=8 << 30)
    skip = steps
    w = profile_run(cfg, rows, args.prompt_len, skip, steps, graphs)
    quiet = w.periods_us(skip // 2, skip - 1)  # before the profiler started
    profiled = w.periods_us(skip + 1, skip + steps - 1)  # inside it, past its first step
    acts = device_activities(w.prof, cuda)
    source = "events"
    if cuda and not acts:
        with tempfile.NamedTemporaryFile(suffix=".json") as f:
            w.prof.export_chrome_trace(f.name)
            with open(f.name) as trace:
                acts = trace_activities(json.load(trace))
        source = "chrome_trace"
    if not acts:
        raise RuntimeError("the profiler recorded no device activity (is CUPTI missing?)")
    r = {"rows": rows, "graphs": graphs, "graph_replays_in_window": w.replays, "source": source,
         "step_period_us_unprofiled": pct(quiet, 50), "step_period_us_profiled": pct(profiled, 50),
         **summarize_activities(acts, steps, pct(quiet, 50))}
    if trace_path:
        w.prof.export_chrome_trace(trace_path)
        size = os.path.getsize(trace_path)
        r["trace"], r["trace_bytes"] = trace_path, size
        if size > 15 << 20:  # over what comes back from the device: keep the figures, drop the file
            os.unlink(trace_path)
            r["trace"] = "dropped: too large"
    del w
    if cuda:
        torch.cuda.empty_cache()
    print_profile(f"batch {rows} {'graphs' if graphs else 'eager'}", r)
    return r


def print_profile(label: str, r: dict) -> None:
    sh = r["share"]
    print(f"\nprofile {label}: {r['kernels_per_step']:.0f} kernels/step, kernel time {r['kernel_us_per_step']:.0f} us"
          f"/step (busy {r['busy_us_per_step']:.0f}) vs step period {r['step_period_us_unprofiled']:.0f} us "
          f"({r['kernel_fraction_of_period']:.2f}; {r['step_period_us_profiled']:.0f} us under the profiler); "
          f"GEMM/GEMV {sh.get('gemm', 0):.2f}, attention {sh.get('attention', 0):.2f}, copies {sh.get('copy', 0):.2f}, "
          f"other {sh.get('other', 0):.2f}; graph replays in window {r['graph_replays_in_window']}", flush=True)
    print(f"  {'kernel':<80} {'class':>9} {'calls':>6} {'total us':>10} {'us/step':>9} {'share':>6}")
    for k in r["top"]:
        print(f"  {k['name']:<80} {k['class']:>9} {k['calls']:>6} {k['total_us']:>10.1f} {k['us_per_step']:>9.2f} "
              f"{k['share']:>6.3f}")


# (result key, rows, decode steps profiled, CUDA graphs); eager batch 1 first: if
# attaching the profiler after capture upsets graphs, its figures are in already.
PROFILES = (("profile_b1_eager", 1, 20, False), ("profile_b1", 1, 20, True), ("profile_b64", 64, 10, True))


# --------------------------------------------------------------------------- main
LOAD_SECONDS: dict[str, float] = {}  # model -> seconds its (dummy) weights took to load


def _load_once(load):
    """load_model keyed by what shapes the weights (not by the TorchOps instance:
    every engine's ops put tensors on the same device)."""
    cache: dict = {}

    def wrapped(cfg: EngineConfig, ops):
        key = (cfg.model, cfg.load_format, cfg.dtype, cfg.seed, cfg.max_model_len)
        if key not in cache:
            t0 = time.perf_counter()
            cache[key] = load(cfg, ops)
            ops.synchronize()  # dummy weights are drawn on the device, asynchronously
            LOAD_SECONDS[cfg.model] = time.perf_counter() - t0
            print(f"  loaded {cfg.model} in {LOAD_SECONDS[cfg.model]:.1f} s", flush=True)
        cache[key].model.ops = ops  # the model runs on this engine's ops (fused or not), not the first one's
        return cache[key]

    return wrapped


def _section(r: dict, name: str, fn, *a) -> None:
    """One section failing must not lose the others' figures."""
    try:
        r[name] = fn(*a)
    except Exception:
        r[name + "_error"] = traceback.format_exc()
        print(f"section {name} failed:\n{r[name + '_error']}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama-3.2-1b", help="a shape name (dummy weights), or tiny")
    ap.add_argument("--device", choices=["gpu", "cpu"], default="gpu",
                    help="cpu: only the profile section, as a smoke check of its code path")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=512)
    ap.add_argument("--batch1-tokens", type=int, default=256)
    ap.add_argument("--max-batched-tokens", type=int, default=2048)
    ap.add_argument("--sections", default="bw,handoff,engine,hf,peer,sampler,profile")
    ap.add_argument("--batches", default="", help="engine batch sizes, comma-separated (default: --requests and 1)")
    ap.add_argument("--peer-batches", default="", help="HF and compiled-peer batch sizes (default: --requests and 1)")
    ap.add_argument("--modes", default="", help="engine modes to run, comma-separated (default: all of MODES)")
    ap.add_argument("--profile-trace", default="", help="write batch 1's (graphs) Chrome trace here (.json.gz)")
    ap.add_argument("--profile-timeout", type=float, default=300,
                    help="seconds the profile section may take before the process dumps its stacks and exits")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    sections = set(args.sections.split(","))
    cuda = args.device == "gpu"
    if not cuda and sections - {"profile"}:
        print(f"--device cpu: skipping {sorted(sections - {'profile'})} (they need CUDA)", flush=True)
        sections &= {"profile"}

    # One dummy model for every run: loading 1.24 B random weights takes a while,
    # and the weights are read-only (each run allocates its own KV cache).
    engine_mod.load_model = _load_once(engine_mod.load_model)  # type: ignore[assignment]

    shape = NAMED_SHAPES.get(args.model)
    weight_bytes = shape.num_parameters() * 2 if shape is not None else 0
    r: dict = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
               "date": time.strftime("%F"), "argv": sys.argv, "weight_bytes": weight_bytes,
               "native_cuda": cuda_handoff.native() is not None}

    def save() -> None:
        # After every section: a crash or a hang later (the profiler runs last) keeps these.
        if args.out:
            with open(args.out + ".tmp", "w") as f:
                json.dump(r, f, indent=1, default=str)
            os.replace(args.out + ".tmp", args.out)

    if "bw" in sections:
        r["copy_bw_Bps"] = copy_bandwidth()
        r["roofline_ms"] = weight_bytes / r["copy_bw_Bps"] * 1e3
        print(f"copy bandwidth {r['copy_bw_Bps'] / 1e12:.2f} TB/s; roofline {r['roofline_ms']:.3f} ms", flush=True)
        save()
    if "handoff" in sections and cuda_handoff.native() is not None:
        _section(r, "handoff", handoff_latency)
        print("handoff", r.get("handoff"), flush=True)
        save()
    batches = [int(b) for b in args.batches.split(",")] if args.batches else [args.requests, 1]
    peer_batches = [int(b) for b in args.peer_batches.split(",")] if args.peer_batches else [args.requests, 1]
    if "sampler" in sections:
        from sampler_bench import sampler_bench

        _section(r, "sampler_b64", sampler_bench, 64)
        print("sampler", r.get("sampler_b64"), flush=True)
        save()
    if "gemv" in sections and args.model in NAMED_SHAPES:
        from sampler_bench import gemv_bench

        _section(r, "gemv", gemv_bench, args.model)
        for name, g in r.get("gemv", {}).items():
            print(f"gemv {name:8} {g['n']:>6}x{g['k']:<6} split {g['split']:>2}: cuBLAS {g['cublas_us']:7.1f} us "
                  f"{g['cublas_TBps']:.2f} TB/s | Triton {g['triton_us']:7.1f} us {g['triton_TBps']:.2f} TB/s "
                  f"(rel err {g['rel_err']:.1e})", flush=True)
        save()
    if "engine" in sections:
        for b in batches:
            _section(r, f"engine_b{b}", engine_bench, args, b, args.max_tokens if b > 1 else args.batch1_tokens)
            save()
    if "peer" in sections:
        from static_peer import peer_bench

        for b in peer_batches:
            _section(r, f"peer_b{b}", peer_bench, args.model, b, args.prompt_len + args.max_tokens)
            print("peer", r.get(f"peer_b{b}"), flush=True)
            save()
    if "hf" in sections:
        for b in peer_batches:
            _section(r, f"hf_b{b}", hf_bench, args, b, args.max_tokens if b > 1 else args.batch1_tokens)
            save()
    r["load_s"] = LOAD_SECONDS
    save()
    if sections - {"profile"}:
        print_table(r, args)
        print_issue13(r, batches, peer_batches)
    if "profile" in sections:
        # A profiler that hangs in native code would hold the device until the
        # session's limit: end the process instead (every earlier figure is saved).
        faulthandler.dump_traceback_later(args.profile_timeout, exit=True)
        for key, rows, steps, graphs in PROFILES:
            if graphs and not cuda:
                continue  # graphs need CUDA; on the CPU the eager run is the smoke check
            trace = args.profile_trace if key == "profile_b1" or (not cuda and key == "profile_b1_eager") else ""
            _section(r, key, profile_bench, args, rows, steps, graphs, trace)
            save()
        faulthandler.cancel_dump_traceback_later()
        print_profile_summary(r)


def print_issue13(r: dict, batches: list[int], peer_batches: list[int]) -> None:
    """The default configuration (depth3) greedy and sampled, against the peers."""
    print(f"\n{'batch':>6}{'greedy ms':>11}{'sampled ms':>11}{'ratio':>7}{'greedy dev':>11}{'sampled dev':>12}"
          f"{'greedy tok/s':>13}{'sampled tok/s':>14}{'peer ms':>9}{'HF ms':>8}{'sampled eager tok/s':>20}")
    nan = float("nan")
    for b in batches:
        e = r.get(f"engine_b{b}", {})
        g, sm = e.get("depth3", {}), e.get("depth3_sampled", {})
        gp, sp = g.get("step_period_ms_p50", nan), sm.get("step_period_ms_p50", nan)
        peer, hf = r.get(f"peer_b{b}", {}), r.get(f"hf_b{b}", {})
        print(f"{b:>6}{gp:>11.3f}{sp:>11.3f}{sp / gp:>7.3f}"
              f"{e.get('probe', {}).get('device_only_ms_p50', nan):>11.3f}"
              f"{e.get('probe_sampled', {}).get('device_only_ms_p50', nan):>12.3f}"
              f"{g.get('tokens_per_s', nan):>13.0f}{sm.get('tokens_per_s', nan):>14.0f}"
              f"{peer.get('step_ms_p50', nan):>9.3f}{hf.get('step_ms', nan):>8.2f}"
              f"{e.get('sampled_eager', {}).get('tokens_per_s', nan):>20.0f}")
        if e:
            print(f"        greedy identical in every fused mode: {e.get('identical_tokens')}; seeded sampled "
                  f"identical across {e.get('sampled_modes')}: {e.get('sampled_identical_tokens')}")
    if "roofline_ms" in r and "engine_b1" in r:
        for mode in ("depth3", "depth3_gemv"):
            b1 = r["engine_b1"].get(mode, {}).get("step_period_ms_p50", nan)
            print(f"batch-1 step ({mode}) {b1:.3f} ms = {r['roofline_ms'] / b1:.0%} of the HBM roofline "
                  f"({r['roofline_ms']:.3f} ms); device-only "
                  f"{r['engine_b1'].get(mode.replace('depth3', 'probe'), {}).get('device_only_ms_p50', nan):.3f} ms")


def print_profile_summary(r: dict) -> None:
    rows = [(k, r[k]) for k, *_ in PROFILES if k in r]
    if not rows:
        return
    print(f"\n{'profile':<18}{'kernels/step':>13}{'kernel us':>10}{'busy us':>9}{'period us':>10}{'fraction':>9}"
          f"{'gemm':>6}{'attn':>6}{'other':>6}")
    for k, p in rows:
        sh = p["share"]
        print(f"{k:<18}{p['kernels_per_step']:>13.0f}{p['kernel_us_per_step']:>10.0f}{p['busy_us_per_step']:>9.0f}"
              f"{p['step_period_us_unprofiled']:>10.0f}{p['kernel_fraction_of_period']:>9.2f}"
              f"{sh.get('gemm', 0):>6.2f}{sh.get('attention', 0):>6.2f}{sh.get('other', 0):>6.2f}")
    if "roofline_ms" in r and "profile_b1" in r:
        print(f"batch-1 HBM roofline {r['roofline_ms'] * 1e3:.0f} us/step; GEMM/GEMV kernel time "
              f"{r['profile_b1']['us_per_step_by_class'].get('gemm', 0):.0f} us/step")


def print_table(r: dict, args: argparse.Namespace) -> None:
    print(f"\n{r['device']}  torch {r['torch']}  native _cuda: {r['native_cuda']}  {r['date']}")
    if "copy_bw_Bps" in r:
        print(f"copy bw {r['copy_bw_Bps'] / 1e12:.2f} TB/s  weights {r['weight_bytes'] / 1e9:.2f} GB  "
              f"roofline {r['roofline_ms']:.3f} ms/step")
    if "handoff" in r:
        h = r["handoff"]
        print("copy-to-wake us: " + " | ".join(
            f"{m} p50 {h[m + '_p50_us']:.1f} p99 {h[m + '_p99_us']:.1f}"
            for m in ("hostfunc_eventfd", "event_sync_thread", "spin_thread")))
    for key, label in ((k, f"batch {k[len('engine_b'):]}") for k in r
                       if k.startswith("engine_b") and isinstance(r[k], dict)):
        if key not in r:
            continue
        e = r[key]
        modes = [m.name for m in MODES if m.name in e]
        print(f"\n{label}: identical tokens in every fused mode: {e['identical_tokens']}; "
              f"unfused: {e.get('unfused_same_requests', float('nan')):.0%} of requests the same")
        print(f"{'':20}" + "".join(f"{m:>16}" for m in modes))
        for k in ("tokens_per_s", "step_period_ms_p50", "step_events_ms_p50", "device_only_ms_p50", "gap_us_p50",
                  "gap_us_p99", "host_launch_ms_p50", "launch_ms", "wait_ms", "postprocess_ms", "decode_steps",
                  "timed_captures"):
            print(f"{k:<20}" + "".join(f"{e[m].get(k, float('nan')):>16.3f}" for m in modes))
        if not all(m.name in e for m in MODES):
            continue  # --modes ran a subset: the ratios below need them all
        dev = e["probe"]["device_only_ms_p50"]
        print(f"overlap_spin/overlap {e['overlap_spin']['tokens_per_s'] / e['overlap']['tokens_per_s']:.2f}x; "
              f"overlap/sync {e['overlap']['tokens_per_s'] / e['sync']['tokens_per_s']:.2f}x (graphs), "
              f"{e['overlap_eager']['tokens_per_s'] / e['sync_eager']['tokens_per_s']:.2f}x (eager); "
              f"step period / device-only {e['overlap_spin']['step_period_ms_p50'] / dev:.2f}")
        if "unfused" in e:
            print(f"fused/unfused {e['overlap_spin']['tokens_per_s'] / e['unfused']['tokens_per_s']:.2f}x tok/s; "
                  f"device-only {e['unfused_probe']['device_only_ms_p50']:.3f} -> {dev:.3f} ms")
        if key == "engine_b1" and "roofline_ms" in r:
            print(f"batch-1 roofline fraction: {r['roofline_ms'] / e['overlap_spin']['step_period_ms_p50']:.2f}")
    for key in (k for k in r if k.startswith("hf_b") and isinstance(r[k], dict)):
        if key in r:
            h = r[key]
            eng = r.get("engine" + key[2:], {}).get("overlap_spin", {})
            ratio = eng.get("tokens_per_s", float("nan")) / h["tokens_per_s"]
            print(f"HF static cache batch {h['batch']}: {h['tokens_per_s']:.0f} tok/s, {h['step_ms']:.2f} ms/step; "
                  f"engine/HF {ratio:.2f}x")


if __name__ == "__main__":
    main()
