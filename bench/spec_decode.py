"""Speculative decoding (ngram prompt lookup) vs plain decoding, in one run.

One engine with `speculative = "ngram"` serves both sides: the plain side's
requests turn speculation off per request (`speculative: false`, SPEC 2.2), so
both run the same weights, the same process and the same pipeline order.
The workload is one whose greedy output repeats its prompt (a text to copy
once more, a table to write again, chat requests to repeat a paragraph or a
list), where prompt lookup has something to find. Each
repeat runs the plain side, then the speculative side (or the reverse, in
alternation), one request at a time (batch 1) or `--batch` at once; the
figures are the medians over repeats. Greedy outputs must be identical, token
for token, or the benchmark fails.

    python bench/spec_decode.py                         # default model (SmolLM2-135M-Instruct), CPU
    python bench/spec_decode.py --k 4 --batch 4 --repeats 5
    python bench/spec_decode.py --model llama-3.2-1b --load-format dummy --runtime torch --device gpu

The GPU run (for the record; not measured by this CPU benchmark's author):
    python bench/spec_decode.py --runtime torch --device gpu --batch 1
    python bench/spec_decode.py --runtime torch --device gpu --batch 32
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from overlapd.stages.engine import LLMEngine
from overlapd.stages.engine_config import DEFAULT_MODEL, EngineConfig
from overlapd.stages.step_types import SamplingParams

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


def run_side(engine: LLMEngine, prompts: list[str], max_tokens: int, speculative: bool,
             batch: int) -> tuple[float, int, int, list[list[int]]]:
    """(seconds, tokens, steps, outputs) for all prompts, `batch` requests at a time."""
    sp = SamplingParams(max_tokens=max_tokens, temperature=0.0, speculative=speculative)
    outputs: list[list[int]] = []
    steps0 = engine.scheduler.last_step_id
    t0 = time.perf_counter()
    for i in range(0, len(prompts), batch):
        outputs += [r.token_ids for r in engine.generate(prompts[i: i + batch], sp)]
    seconds = time.perf_counter() - t0
    return seconds, sum(map(len, outputs)), engine.scheduler.last_step_id - steps0, outputs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--load-format", default="auto")
    ap.add_argument("--runtime", default="paddle")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--k", type=int, default=3, help="num_speculative_tokens")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--ngram-min", type=int, default=1, help="speculative_ngram_min")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--overlap", action="store_true", help="LLMEngine's overlap loop (default: sync)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    cfg = EngineConfig(model=args.model, load_format=args.load_format, runtime=args.runtime, device=args.device,
                       speculative="ngram", num_speculative_tokens=args.k, speculative_ngram_min=args.ngram_min,
                       max_model_len=1024,
                       max_num_seqs=max(8, args.batch))
    engine = LLMEngine(cfg, overlap=args.overlap)
    chat = engine.loaded.chat_template
    prompts = [chat.render([{"role": "user", "content": t}]) if is_chat else t for is_chat, t in TASKS]
    assert engine.spec is not None
    run_side(engine, prompts[:1], 8, True, 1)  # warm-up: first-call allocations on both paths
    run_side(engine, prompts[:1], 8, False, 1)

    plain_s: list[float] = []
    spec_s: list[float] = []
    plain_tps: list[float] = []
    spec_tps: list[float] = []
    per_step: list[float] = []
    acceptance: list[float] = []
    steps = {True: 0, False: 0}
    tokens = 0
    for rep in range(args.repeats):
        for speculative in ((False, True) if rep % 2 == 0 else (True, False)):
            before = engine.spec.stats.snapshot()
            seconds, n, nsteps, outs = run_side(engine, prompts, args.max_tokens, speculative, args.batch)
            after = engine.spec.stats.snapshot()
            steps[speculative] = nsteps
            if speculative:
                spec_s.append(seconds)
                spec_tps.append(n / seconds)
                rows = after["spec_verify_rows"] - before["spec_verify_rows"]
                per_step.append((after["spec_emitted"] - before["spec_emitted"]) / max(rows, 1))
                acceptance.append((after["spec_accepted"] - before["spec_accepted"])
                                  / max(after["spec_proposed"] - before["spec_proposed"], 1))
                spec_out = outs
            else:
                plain_s.append(seconds)
                plain_tps.append(n / seconds)
                plain_out = outs
                tokens = n
        if spec_out != plain_out:
            raise SystemExit("speculative greedy output differs from plain greedy output")
    result = {
        "model": args.model, "runtime": args.runtime, "device": args.device, "k": args.k, "ngram_min": args.ngram_min, "batch": args.batch,
        "requests": len(prompts), "tokens": tokens, "overlap": args.overlap,
        "plain_tok_s": statistics.median(plain_tps), "spec_tok_s": statistics.median(spec_tps),
        "speedup": statistics.median(plain_s) / statistics.median(spec_s),
        "plain_steps": steps[False], "spec_steps": steps[True],
        "tokens_per_verify_row": statistics.median(per_step), "acceptance_rate": statistics.median(acceptance),
        "identical_output": True,
    }
    if args.json:
        print(json.dumps(result))
        return
    print(f"{args.model} ({args.runtime}/{args.device}), k={args.k}, batch {args.batch}, {len(prompts)} requests, "
          f"{tokens} greedy tokens, {'overlap' if args.overlap else 'sync'}, median of {args.repeats}")
    print(f"  plain:       {result['plain_tok_s']:8.1f} tok/s  {steps[False]} steps")
    print(f"  speculative: {result['spec_tok_s']:8.1f} tok/s  {steps[True]} steps  "
          f"({result['speedup']:.2f}x; {result['tokens_per_verify_row']:.2f} tokens per verify row, "
          f"acceptance {result['acceptance_rate']:.0%})")
    print("  outputs identical: yes")


if __name__ == "__main__":
    main()
