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
  bf16, same GPU (torch.compile off: `disable_compile=True`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field

import numpy as np
import torch
from overlapd.daemon.engine_api import GenerateParams
from overlapd.daemon.sinks import CollectSink
from overlapd.kernels import cuda_handoff
from overlapd.kernels.handoff import CompletionQueue
from overlapd.stages import engine as engine_mod
from overlapd.stages.engine_config import EngineConfig
from overlapd.stages.model.config import NAMED_SHAPES
from overlapd.stages.pipeline import Pipeline
from overlapd.stages.pipeline_config import PipelineConfig, RingConfig

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


async def _workload(p: Pipeline, requests: int, prompt_len: int, max_tokens: int, salt: int) -> list[CollectSink]:
    loop = asyncio.get_running_loop()
    sinks = [CollectSink(loop) for _ in range(requests)]
    for i, s in enumerate(sinks):
        prompt = [(7 * i + 11 * salt + j) % 30000 + 3 for j in range(prompt_len)]
        p.submit(GenerateParams(prompt_ids=prompt, max_tokens=max_tokens, temperature=0.0, ignore_eos=True), s)
    await asyncio.gather(*(s.done for s in sinks))
    return sinks


async def pipeline_run(cfg: EngineConfig, overlap: bool, requests: int, prompt_len: int, max_tokens: int,
                       probe_every: int = 0, graphs: bool = True,
                       wake: str = "hostfunc") -> tuple[dict, list[list[int]]]:
    ring = RingConfig(path=os.path.join(tempfile.gettempdir(), f"overlapd-gpu-bench-{os.getpid()}.ring"))
    p = Pipeline(cfg, PipelineConfig(overlap=overlap), ring)
    if not graphs:
        p.engine.runner.graphs = None
    os.environ["OVERLAPD_WAKE"] = wake  # read by the execute stage at start
    await p.start()
    # Warm-up: with graphs, the same workload once, so every (rows, context)
    # bucket is captured before the timed pass; eagerly, one short request.
    await _workload(p, requests if graphs else 1, prompt_len, max_tokens if graphs else 8, salt=1)
    timer = StepTimer(p.engine.runner, probe_every)
    p.times.__init__()
    g = p.engine.runner.graphs
    captures_before = g.captures if g is not None else 0
    t0 = time.perf_counter()
    sinks = await _workload(p, requests, prompt_len, max_tokens, salt=0)
    elapsed = time.perf_counter() - t0
    stats = p.stats()
    await p.drain(timeout=5)
    os.unlink(ring.path)
    tokens = [s.tokens for s in sinks]
    out = {"overlap": overlap, "graphs": graphs, "wake": wake, "elapsed_s": elapsed,
           "graph_captures": (g.captures if g is not None else 0), "timed_captures": (g.captures - captures_before
                                                                                      if g is not None else 0), "tokens": sum(map(len, tokens)),
           "tokens_per_s": sum(map(len, tokens)) / elapsed, "probe_every": probe_every,
           **{k: stats[k] for k in ("preprocess_ms", "launch_ms", "wait_ms", "postprocess_ms", "emit_ms",
                                    "step_interval_ms") if k in stats},
           **timer.summary()}
    del p
    torch.cuda.empty_cache()
    return out, tokens


def engine_bench(args: argparse.Namespace, requests: int, max_tokens: int) -> dict:
    cfg = EngineConfig(model=args.model, load_format="dummy", runtime="torch", device="gpu", dtype="bfloat16",
                       max_num_seqs=max(requests, 1), max_num_batched_tokens=args.max_batched_tokens,
                       max_model_len=args.prompt_len + args.max_tokens + 16, kv_cache_bytes=8 << 30)
    res = {}
    toks = {}
    for name, overlap, probe, graphs, wake in MODES:
        res[name], toks[name] = asyncio.run(pipeline_run(cfg, overlap, requests, args.prompt_len, max_tokens, probe,
                                                         graphs, wake))
        print(f"  batch {requests} {name}: {res[name]['tokens_per_s']:.0f} tok/s", flush=True)
    res["identical_tokens"] = all(t == toks["sync"] for t in toks.values())
    return res


# (name, overlap, probe every n-th decode step, CUDA graphs, completion wake-up)
MODES = (("sync", False, 0, True, "hostfunc"), ("overlap", True, 0, True, "hostfunc"),
         ("overlap_spin", True, 0, True, "spin"), ("probe", True, 8, True, "hostfunc"),
         ("sync_eager", False, 0, False, "hostfunc"), ("overlap_eager", True, 0, False, "hostfunc"))


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


# --------------------------------------------------------------------------- main
def _load_once(load):
    """load_model keyed by what shapes the weights (not by the TorchOps instance:
    every engine's ops put tensors on the same device)."""
    cache: dict = {}

    def wrapped(cfg: EngineConfig, ops):
        key = (cfg.model, cfg.load_format, cfg.dtype, cfg.seed, cfg.max_model_len)
        if key not in cache:
            t0 = time.perf_counter()
            cache[key] = load(cfg, ops)
            print(f"  loaded {cfg.model} in {time.perf_counter() - t0:.1f} s", flush=True)
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
    ap.add_argument("--model", default="llama-3.2-1b")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=512)
    ap.add_argument("--batch1-tokens", type=int, default=256)
    ap.add_argument("--max-batched-tokens", type=int, default=2048)
    ap.add_argument("--sections", default="bw,handoff,engine,hf")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    sections = set(args.sections.split(","))

    # One dummy model for every run: loading 1.24 B random weights takes a while,
    # and the weights are read-only (each run allocates its own KV cache).
    engine_mod.load_model = _load_once(engine_mod.load_model)  # type: ignore[assignment]

    cfg = NAMED_SHAPES[args.model]
    weight_bytes = cfg.num_parameters() * 2
    r: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%F"),
               "argv": sys.argv, "weight_bytes": weight_bytes, "native_cuda": cuda_handoff.native() is not None}
    if "bw" in sections:
        r["copy_bw_Bps"] = copy_bandwidth()
        r["roofline_ms"] = weight_bytes / r["copy_bw_Bps"] * 1e3
        print(f"copy bandwidth {r['copy_bw_Bps'] / 1e12:.2f} TB/s; roofline {r['roofline_ms']:.3f} ms", flush=True)
    if "handoff" in sections and cuda_handoff.native() is not None:
        _section(r, "handoff", handoff_latency)
        print("handoff", r.get("handoff"), flush=True)
    if "engine" in sections:
        _section(r, "engine_b64", engine_bench, args, args.requests, args.max_tokens)
        _section(r, "engine_b1", engine_bench, args, 1, args.batch1_tokens)
    if "hf" in sections:
        _section(r, "hf_b64", hf_bench, args, args.requests, args.max_tokens)
        _section(r, "hf_b1", hf_bench, args, 1, args.batch1_tokens)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(r, f, indent=1, default=str)
    print_table(r, args)


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
    for key, label in (("engine_b64", f"batch {args.requests}"), ("engine_b1", "batch 1")):
        if key not in r:
            continue
        e = r[key]
        modes = [m[0] for m in MODES if m[0] in e]
        print(f"\n{label}: identical tokens in every mode: {e['identical_tokens']}")
        print(f"{'':20}" + "".join(f"{m:>14}" for m in modes))
        for k in ("tokens_per_s", "step_period_ms_p50", "step_events_ms_p50", "device_only_ms_p50", "gap_us_p50",
                  "gap_us_p99", "host_launch_ms_p50", "launch_ms", "wait_ms", "postprocess_ms", "decode_steps",
                  "timed_captures"):
            print(f"{k:<20}" + "".join(f"{e[m].get(k, float('nan')):>14.3f}" for m in modes))
        dev = e["probe"]["device_only_ms_p50"]
        print(f"overlap_spin/overlap {e['overlap_spin']['tokens_per_s'] / e['overlap']['tokens_per_s']:.2f}x; "
              f"overlap/sync {e['overlap']['tokens_per_s'] / e['sync']['tokens_per_s']:.2f}x (graphs), "
              f"{e['overlap_eager']['tokens_per_s'] / e['sync_eager']['tokens_per_s']:.2f}x (eager); "
              f"step period / device-only {e['overlap']['step_period_ms_p50'] / dev:.2f}")
        if key == "engine_b1" and "roofline_ms" in r:
            print(f"batch-1 roofline fraction: {r['roofline_ms'] / e['overlap']['step_period_ms_p50']:.2f}")
    for key in ("hf_b64", "hf_b1"):
        if key in r:
            h = r[key]
            eng = r.get("engine_b64" if key == "hf_b64" else "engine_b1", {}).get("overlap", {})
            ratio = eng.get("tokens_per_s", float("nan")) / h["tokens_per_s"]
            print(f"HF static cache batch {h['batch']}: {h['tokens_per_s']:.0f} tok/s, {h['step_ms']:.2f} ms/step; "
                  f"engine/HF {ratio:.2f}x")


if __name__ == "__main__":
    main()
