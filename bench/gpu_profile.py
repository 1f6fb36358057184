"""bench/gpu.py's profile section: torch.profiler over a window of decode
steps of the real engine; kernels per step, kernel time against the step
period, and the GEMM/GEMV, attention and copy shares."""

from __future__ import annotations

import argparse
import json
import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from overlapd.stages.engine import llm_engine as engine_mod
from overlapd.stages.engine.config import EngineConfig
from overlapd.stages.step_types import SamplingParams

from gpu_engine import pct


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

