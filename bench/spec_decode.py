"""Speculative decoding (ngram prompt lookup, or a draft network) vs plain decoding, in one run.

One engine with `speculative = "ngram"` (or `"draft"`, `--method draft`) serves both sides: the plain side's
requests turn speculation off per request (`speculative: false`, SPEC 2.2), so
both run the same weights, the same process and the same pipeline order.
The workload is one whose greedy output repeats its prompt (a text to copy
once more, a table to write again, chat requests to repeat a paragraph or a
list), where prompt lookup has something to find. Each
repeat runs the plain side, then the speculative side (or the reverse, in
alternation, batch by batch, so both sides see the same background load),
one request at a time (batch 1) or `--batch` at once; tokens/s come from the
median over repeats of each side's total time. Greedy outputs must be identical, token
for token, or the benchmark fails.

    python bench/spec_decode.py                         # default model (SmolLM2-135M-Instruct), CPU
    python bench/spec_decode.py --k 4 --batch 4 --repeats 5
    python bench/spec_decode.py --step-costs               # also single steps of one row, by tokens and drafts
    python bench/spec_decode.py --method draft             # the model's own first layers draft (LayerSkip-style)
    python bench/spec_decode.py --method draft --draft-layers 10
    python bench/spec_decode.py --method draft --model tiny --draft-model tiny
    python bench/spec_decode.py --method draft --acceptance-by-layers 7,15,22,26,28,29 --max-tokens 48
    python bench/spec_decode.py --model llama-3.2-1b --load-format dummy --runtime torch --device gpu

The GPU run (for the record; not measured by this CPU benchmark's author):
    python bench/spec_decode.py --runtime torch --device gpu --batch 1
    python bench/spec_decode.py --runtime torch --device gpu --batch 32 --copies 8
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

from overlapd.stages.engine.config import DEFAULT_MODEL, EngineConfig
from overlapd.stages.engine.llm_engine import LLMEngine
from overlapd.stages.step_types import SamplingParams, ScheduledRow, SchedulerOutput

from model_args import add_model_args, model_fields

PARAGRAPH = ("The old lighthouse keeper climbed the spiral stairs every evening, lit the great lamp, "
             "and watched the ships pass safely through the narrow channel below.")
# (chat?, text): requests whose greedy answers copy or continue what the prompt holds
TASKS = [
    (False, f"Text: {PARAGRAPH}\nCopy of the text: {PARAGRAPH}\nAnother copy of the text:"),
    (False, "id,name,city\n1,Alice,Paris\n2,Bob,London\n3,Carol,Berlin\n4,Dave,Madrid\n\n"
            "The same table again:\nid,name,city\n"),
    (True, f"Repeat this paragraph twice, word for word: {PARAGRAPH}"),
    (True, "List the days of the week, then list them again in the same order, then once more."),
]


def run_side(engine: LLMEngine, prompts: list[str], max_tokens: int,
             speculative: bool) -> tuple[float, int, list[list[int]]]:
    """(seconds, steps, outputs) for `prompts`, run together as one batch."""
    sp = SamplingParams(max_tokens=max_tokens, temperature=0.0, speculative=speculative)
    steps0 = engine.scheduler.last_step_id
    t0 = time.perf_counter()
    outputs = [r.token_ids for r in engine.generate(prompts, sp)]
    return time.perf_counter() - t0, engine.scheduler.last_step_id - steps0, outputs


def step_costs(engine: LLMEngine, repeats: int = 9) -> dict[str, float]:
    """Median ms of one step of one row after a 200-token prompt, by what the
    row carries: n tokens without drafts (a prefill chunk) or 1 + d with d
    drafts (a verify row; with the draft method its drafts are made in the
    step, so the time includes the draft's passes). Rows are built by hand:
    the runner alone."""
    runner, sp = engine.runner, SamplingParams(temperature=0.0)
    blocks = list(range(-(-256 // engine.cfg.block_size)))
    rid = 1 << 40  # no request of the engine's: its slot and blocks are this function's
    prompt = list(range(100, 300))
    drafting = engine.cfg.speculative == "draft"
    # a separate draft model computes its own KV of the prompt in the same step
    catch_up = (0, prompt) if drafting else None
    runner.execute(SchedulerOutput(1, [ScheduledRow(rid, prompt, 0, False, True, 0, blocks, sp, 0,
                                                    draft_chunk=catch_up)]))
    out: dict[str, float] = {}
    for n, d in ((1, 0), (2, 0), (4, 0), (2, 1), (4, 3)):
        times = []
        for _ in range(repeats):
            chunk = (200, [5]) if drafting and d else None  # the draft is caught up: its chunk is the last token
            row = ScheduledRow(rid, [5] * n, 200, False, True, 1, blocks, sp, 0, num_drafts=d, draft_chunk=chunk)
            t0 = time.perf_counter()
            runner.execute(SchedulerOutput(2, [row]))
            times.append(time.perf_counter() - t0)
        out[f"{n} tokens, {d} drafts"] = 1e3 * statistics.median(times)
    return out


def first_divergence(plain: list[list[int]], spec: list[list[int]], differ: list[int]) -> int:
    """The output index where the first differing request's two outputs part (-1: none differ)."""
    if not differ:
        return -1
    a, b = plain[differ[0]], spec[differ[0]]
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def profile_side(engine: LLMEngine, prompts: list[str], max_tokens: int, speculative: bool) -> dict:
    """One side's run of `prompts` under torch.profiler: kernels and kernel time per
    step (bench/gpu.py's summary; CUDA only)."""
    import torch
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from gpu import device_activities, summarize_activities
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        _, steps, _ = run_side(engine, prompts, max_tokens, speculative)
        torch.cuda.synchronize()
    return summarize_activities(device_activities(prof, True), steps, float("nan"))


def step_timer(engine: LLMEngine):
    """bench/gpu.py's StepTimer on the engine's runner (imported only for --gaps: it needs CUDA)."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from gpu import StepTimer
    return StepTimer(engine.runner)


def gap_summary(timers: list) -> dict[str, float]:
    """Gaps and periods over every timed batch of one side (each timer's own consecutive steps)."""
    import numpy as np
    gaps: list[float] = []
    periods: list[float] = []
    steps = 0
    for t in timers:
        t.summary()  # synchronizes
        r = t.records
        steps += sum(x.decode for x in r)
        for a, b in zip(r, r[1:]):
            if a.decode and b.decode:
                gaps.append(a.end.elapsed_time(b.start) * 1e3)
                periods.append(a.end.elapsed_time(b.end))
    pct = lambda xs, q: float(np.percentile(xs, q)) if xs else float("nan")  # noqa: E731
    return {"gap_us_p50": pct(gaps, 50), "gap_us_p99": pct(gaps, 99), "step_period_ms_p50": pct(periods, 50),
            "decode_steps": steps}


def acceptance_by_layers(engine: LLMEngine, prompts: list[str], max_tokens: int,
                         layers: list[int]) -> dict[int, dict[str, float]]:
    """The self-draft's acceptance and tokens per verify row over `prompts`
    (one batch) for each draft depth L: the same engine, its drafter's view
    of the target swapped between runs."""
    from overlapd.stages.spec.draft_model import self_draft

    drafter, spec = engine.runner.drafter, engine.spec
    assert drafter is not None and drafter.draft.shares_target_kv and spec is not None, "needs the self-draft"
    out: dict[int, dict[str, float]] = {}
    for n in layers:
        drafter.draft = self_draft(engine.loaded.model, engine.runner.kv_caches, n)
        before = spec.stats.snapshot()
        run_side(engine, prompts, max_tokens, True)
        after = spec.stats.snapshot()
        d = {key: after[key] - before[key] for key in ("spec_verify_rows", "spec_proposed", "spec_accepted",
                                                       "spec_emitted")}
        out[n] = {"acceptance_rate": d["spec_accepted"] / max(d["spec_proposed"], 1),
                  "tokens_per_verify_row": d["spec_emitted"] / max(d["spec_verify_rows"], 1)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap, model=DEFAULT_MODEL, dtype="")
    ap.add_argument("--method", choices=["ngram", "draft"], default="ngram", help="speculative")
    ap.add_argument("--draft-model", default="", help="--method draft: speculative_draft_model (default: self-draft)")
    ap.add_argument("--draft-layers", type=int, default=0,
                    help="--method draft, no --draft-model: the target's first L layers draft (0: a quarter)")
    ap.add_argument("--acceptance-by-layers", default="", metavar="L1,L2,...",
                    help="--method draft, self-draft: only report acceptance for each draft depth (no timing)")
    ap.add_argument("--k", type=int, default=3, help="num_speculative_tokens")
    ap.add_argument("--batch", type=int, default=1, help="requests run together")
    ap.add_argument("--max-batch", type=int, default=0,
                    help="speculative_max_batch: no drafts in steps with more requests running (0: no limit)")
    ap.add_argument("--copies", type=int, default=1, help="each task this many times (for large batches)")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--ngram-min", type=int, default=1, help="speculative_ngram_min")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--overlap", action="store_true", help="LLMEngine's overlap loop (default: sync)")
    ap.add_argument("--gaps", action="store_true",
                    help="GPU: CUDA events around each step's launch in the first repeat (bench/gpu.py's StepTimer): "
                         "device idle gap between consecutive decode steps and step period, per side")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--profile", action="store_true",
                    help="GPU: run the first batch once more per side under torch.profiler and print kernels per step")
    ap.add_argument("--step-costs", action="store_true",
                    help="also time single steps of one row: 1, 2, 4 tokens plain and as verify rows")
    args = ap.parse_args()

    cfg = EngineConfig(**model_fields(args), speculative=args.method, num_speculative_tokens=args.k,
                       speculative_ngram_min=args.ngram_min, speculative_max_batch=args.max_batch,
                       speculative_draft_model=args.draft_model, speculative_draft_layers=args.draft_layers,
                       max_model_len=1024,
                       max_num_seqs=max(8, args.batch))
    engine = LLMEngine(cfg, overlap=args.overlap)
    chat = engine.loaded.chat_template
    prompts = [chat.render([{"role": "user", "content": t}]) if is_chat else t for is_chat, t in TASKS] * args.copies
    assert engine.spec is not None
    if args.acceptance_by_layers:
        sweep = acceptance_by_layers(engine, prompts, args.max_tokens,
                                     [int(x) for x in args.acceptance_by_layers.split(",")])
        for n, r in sweep.items():
            print(f"self-draft L={n}: acceptance {r['acceptance_rate']:.0%}, "
                  f"{r['tokens_per_verify_row']:.2f} tokens per verify row (k={args.k}, {len(prompts)} requests, "
                  f"{args.max_tokens} tokens at most)")
        return
    run_side(engine, prompts[:1], 8, True)  # warm-up: first-call allocations on both paths
    run_side(engine, prompts[:1], 8, False)

    for group in [prompts[i: i + args.batch] for i in range(0, len(prompts), args.batch)]:
        for speculative in (False, True):  # an untimed round: every CUDA graph the timed ones replay is captured
            run_side(engine, group, args.max_tokens, speculative)

    # Sides alternate batch by batch (plain first in even repeats, speculative
    # first in odd ones): on a shared host both see the same background load.
    batches = [prompts[i: i + args.batch] for i in range(0, len(prompts), args.batch)]
    seconds = {False: [0.0] * args.repeats, True: [0.0] * args.repeats}
    steps = {False: 0, True: 0}
    outputs: dict[bool, list[list[int]]] = {False: [], True: []}
    before = engine.spec.stats.snapshot()
    timers: dict[bool, list] = {False: [], True: []}
    for rep in range(args.repeats):
        for group in batches:
            for speculative in ((False, True) if rep % 2 == 0 else (True, False)):
                timer = step_timer(engine) if args.gaps and rep == 0 else None
                try:
                    s, n, outs = run_side(engine, group, args.max_tokens, speculative)
                finally:
                    if timer is not None:
                        engine.runner.launch = timer._launch
                        timers[speculative].append(timer)
                seconds[speculative][rep] += s
                if rep == 0:
                    steps[speculative] += n
                    outputs[speculative] += outs
    after = engine.spec.stats.snapshot()
    differ = [i for i, (a, b) in enumerate(zip(outputs[False], outputs[True])) if a != b]
    tokens = sum(map(len, outputs[False]))
    delta = {key: after[key] - before[key] for key in ("spec_verify_rows", "spec_proposed", "spec_accepted", "spec_emitted",
                                                       "spec_chained_rows", "spec_lagged_rows",
                                                       "spec_paused_steps")}
    plain_s, spec_s = statistics.median(seconds[False]), statistics.median(seconds[True])
    result = {
        "model": args.model, "runtime": args.runtime, "device": args.device, "method": args.method,
        "draft": engine.runner.drafter.draft.name if engine.runner.drafter is not None else None,
        "k": args.k, "ngram_min": args.ngram_min,
        "batch": args.batch, "requests": len(prompts), "tokens": tokens, "overlap": args.overlap,
        "plain_tok_s": tokens / plain_s, "spec_tok_s": tokens / spec_s, "speedup": plain_s / spec_s,
        "plain_steps": steps[False], "spec_steps": steps[True],
        "plain_step_ms": 1e3 * plain_s / steps[False], "spec_step_ms": 1e3 * spec_s / steps[True],
        "tokens_per_verify_row": delta["spec_emitted"] / max(delta["spec_verify_rows"], 1),
        "acceptance_rate": delta["spec_accepted"] / max(delta["spec_proposed"], 1),
        "verify_rows": delta["spec_verify_rows"], "chained_rows": delta["spec_chained_rows"],
        "lagged_rows": delta["spec_lagged_rows"], "max_batch": args.max_batch,
        "paused_steps": delta["spec_paused_steps"],
        "identical_output": not differ, "differing_outputs": len(differ),
        "first_divergence": first_divergence(outputs[False], outputs[True], differ),
    }
    if args.gaps:
        result["gaps"] = {side: gap_summary(timers[spec]) for side, spec in (("plain", False), ("spec", True))}
    if args.step_costs:
        result["step_ms"] = step_costs(engine)
    if args.profile:
        result["profile"] = {side: profile_side(engine, batches[0], args.max_tokens, spec)
                             for side, spec in (("plain", False), ("spec", True))}
    if args.json:
        print(json.dumps(result))
        raise SystemExit(1 if differ else 0)
    method = args.method + (f" ({result['draft']})" if result["draft"] else "")
    print(f"{args.model} ({args.runtime}/{args.device}), {method}, k={args.k}, batch {args.batch}, {len(prompts)} requests, "
          f"{tokens} greedy tokens, {'overlap' if args.overlap else 'sync'}, median of {args.repeats}")
    print(f"  plain:       {result['plain_tok_s']:8.1f} tok/s  {steps[False]} steps of {result['plain_step_ms']:.1f} ms")
    print(f"  speculative: {result['spec_tok_s']:8.1f} tok/s  {steps[True]} steps of {result['spec_step_ms']:.1f} ms  "
          f"({result['speedup']:.2f}x; {result['tokens_per_verify_row']:.2f} tokens per verify row, "
          f"acceptance {result['acceptance_rate']:.0%}; {result['verify_rows']} verify rows, "
          f"{result['chained_rows']} chained, {result['lagged_rows']} after a miss"
          + (f"; {result['paused_steps']} steps paused by --max-batch {args.max_batch}" if args.max_batch else "")
          + ")")
    if differ:
        print(f"  outputs identical: NO, {len(differ)} of {len(prompts)} differ; first divergence at output token "
              f"{result['first_divergence']} (of request {differ[0]})")
    else:
        print("  outputs identical: yes")
    for side, g in result.get("gaps", {}).items():
        print(f"  {side}: GPU idle gap between decode steps p50 {g['gap_us_p50']:.1f} us, p99 {g['gap_us_p99']:.1f} us; "
              f"step period p50 {g['step_period_ms_p50']:.3f} ms over {g['decode_steps']} decode steps")
    for what, ms in result.get("step_ms", {}).items():
        print(f"  one step, {what}: {ms:.1f} ms")
    for side, p in result.get("profile", {}).items():
        print(f"  {side} under the profiler: {p['kernels_per_step']:.0f} kernels, {p['kernel_us_per_step']:.0f} us of "
              f"kernels a step; by class (us a step): "
              + ", ".join(f"{c} {v:.0f}" for c, v in p["us_per_step_by_class"].items()))
        for t in p["top"][:8]:
            print(f"    {t['us_per_step']:7.1f} us/step  {t['calls'] / p['steps']:5.1f} calls/step  {t['name']}")
    if differ:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
