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
in for kernels; CI runs it): python bench/gpu.py --device cpu --model tiny --sections profile

The pipeline section is in gpu_engine.py, the profile section in gpu_profile.py,
the sampler section in sampler_bench.py, the GEMV and chain sections in
gemv_bench.py, the compiled peer in static_peer.py.
"""

from __future__ import annotations

import argparse
import asyncio
import faulthandler
import json
import os
import statistics
import sys
import time
import traceback

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the bench's own modules (static_peer, ...)
from overlapd.kernels import cuda_handoff
from overlapd.kernels.handoff import CompletionQueue
from overlapd.stages.engine import llm_engine as engine_mod
from overlapd.stages.engine.config import EngineConfig
from overlapd.stages.model.config import NAMED_SHAPES
from gpu_engine import MODES, engine_bench, pct
from gpu_profile import PROFILES, print_profile_summary, profile_bench

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
LOAD_SECONDS: dict[str, float] = {}  # model -> seconds its (dummy) weights took to load


def _load_once(load):
    """load_model keyed by what shapes the weights (not by the TorchOps instance:
    every engine's ops put tensors on the same device)."""
    cache: dict = {}

    def wrapped(cfg: EngineConfig, ops, shard=None):
        key = (cfg.model, cfg.load_format, cfg.dtype, cfg.seed, cfg.max_model_len, shard)
        if key not in cache:
            t0 = time.perf_counter()
            cache[key] = load(cfg, ops, shard)
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
        from gemv_bench import gemv_bench

        _section(r, "gemv", gemv_bench, args.model)
        for name, g in r.get("gemv", {}).items():
            sweep = " ".join(f"{k[8:-3]} {v:.1f}" for k, v in g.items() if k.startswith("triton_bn"))
            print(f"gemv {name:8} {g['n']:>6}x{g['k']:<6} plan {g['plan']}: cuBLAS {g['cublas_us']:7.1f} us "
                  f"{g['cublas_TBps']:.2f} TB/s | Triton {g['triton_us']:7.1f} us {g['triton_TBps']:.2f} TB/s "
                  f"(rel err {g['rel_err']:.1e}) | rows per program: {sweep}", flush=True)
        save()
    if "chain" in sections and args.model in NAMED_SHAPES:
        from gemv_bench import chain_bench, pdl_probe

        _section(r, "pdl_probe", pdl_probe)
        print("pdl probe", r.get("pdl_probe"), flush=True)

        _section(r, "chain", chain_bench, args.model)
        ch = r.get("chain", {})
        for name in [k[:-3] for k in ch if k.endswith("_us")]:
            print(f"chain {name:9} {ch[f'{name}_us']:8.1f} us {ch[f'{name}_TBps']:.2f} TB/s "
                  f"(rel err {ch[f'{name}_rel_err']:.1e})", flush=True)
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
        for mode in ("depth3", "depth3_nopdl", "depth3_cublas"):
            b1 = r["engine_b1"].get(mode, {}).get("step_period_ms_p50", nan)
            print(f"batch-1 step ({mode}) {b1:.3f} ms = {r['roofline_ms'] / b1:.0%} of the HBM roofline "
                  f"({r['roofline_ms']:.3f} ms); device-only "
                  f"{r['engine_b1'].get(mode.replace('depth3', 'probe'), {}).get('device_only_ms_p50', nan):.3f} ms")


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
