"""Engine step time and tokens/s on the CPU, against a straightforward implementation.

Measures the execute side (ModelRunner.execute: staging, forward, sampling,
read-back; greedy) for the tiny model, the default model (SmolLM2-135M-Instruct,
real weights from its GGUF) and the Llama-3.2-1B shape with dummy weights, at
batch 1 and 4 (or --batches): one prefill step of short prompts, then a few
dozen decode steps. The baseline runs the same weights in the same run:

- Hugging Face transformers on torch's CPU build (`generate`-style loop with
  its default KV cache), in a subprocess so torch and paddle never share a
  process. Not a project dependency; install it with
      pip install torch==2.13.0 transformers
- without them, the numpy reference (stages/model/reference.py: no KV cache,
  full recompute each token), tiny model only.

Both sides use the same number of BLAS threads (--threads; default: what the
Paddle runtime chose). Decode steps alternate between the two sides'
processes' runs (--repeats), and the best median of the repeats is reported,
since other work on the host inflates single runs.

    python bench/engine.py                       # tiny + llama-3.2-1b, batch 1 and 4
    python bench/engine.py --models tiny --steps 64
    python bench/engine.py --models smollm2 --batches 1,16
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass

import numpy as np

SHAPES = {"tiny": ("tiny", "auto"), "smollm2": ("smollm2-135m-instruct", "auto"),
          "llama-3.2-1b": ("llama-3.2-1b", "dummy")}


def prompts(batch: int, length: int, bos: int) -> list[list[int]]:
    """Deterministic prompts valid in every vocabulary here (ids 3..252)."""
    return [[bos] + [(97 + 13 * i + 7 * j) % 250 + 3 for j in range(length - 1)] for i in range(batch)]


@dataclass
class Result:
    prefill_ms: float
    step_ms: list[float]
    tokens: list[list[int]]

    @property
    def median_ms(self) -> float:
        return float(np.median(self.step_ms))


# --- ours ------------------------------------------------------------------------
def run_engine(model: str, batch: int, plen: int, steps: int, loaded_cache: dict) -> Result:
    from overlapd.stages.engine.config import EngineConfig
    from overlapd.stages.model.loader import load_model
    from overlapd.stages.runner.model_runner import ModelRunner
    from overlapd.stages.runtime import load_runtime
    from overlapd.stages.step_types import SamplingParams, ScheduledRow, SchedulerOutput

    name, fmt = SHAPES[model]
    cfg = EngineConfig(model=name, load_format=fmt, max_num_seqs=max(8, batch),
                       max_num_batched_tokens=max(256, batch * plen), max_model_len=256, block_size=16,
                       num_blocks=max(8, batch) * 16)
    ops = loaded_cache.setdefault("ops", load_runtime("paddle", "cpu"))
    if model not in loaded_cache:
        t = time.perf_counter()
        loaded_cache[model] = load_model(cfg, ops)
        print(f"  loaded {model} ({fmt}) in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    loaded = loaded_cache[model]
    runner = ModelRunner(loaded, ops, cfg, cfg.num_blocks)
    greedy = SamplingParams(temperature=0.0, max_tokens=steps + 1)
    ps = prompts(batch, plen, loaded.config.bos_token_id or 0)
    blocks = [list(range(i * 16, (i + 1) * 16)) for i in range(batch)]
    rows = [ScheduledRow(i, p, 0, False, True, 0, blocks[i], greedy, 0) for i, p in enumerate(ps)]
    t = time.perf_counter()
    out = runner.execute(SchedulerOutput(1, rows))
    prefill = (time.perf_counter() - t) * 1e3
    tokens = [[int(x)] for x in out.sampled]
    times = []
    for step in range(steps):
        rows = [ScheduledRow(i, [tokens[i][-1]], plen + step, False, True, step + 1, blocks[i], greedy, 0)
                for i in range(batch)]
        t = time.perf_counter()
        out = runner.execute(SchedulerOutput(step + 2, rows))
        times.append((time.perf_counter() - t) * 1e3)
        for i in range(batch):
            tokens[i].append(int(out.sampled[i]))
    return Result(prefill, times, tokens)


# --- baselines (run in a subprocess) ----------------------------------------------
def _hf_model(model: str, seed: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from overlapd.stages.model.config import NAMED_SHAPES
    from overlapd.stages.model.llama import param_layout
    from overlapd.stages.model.random_weights import random_weight
    from overlapd.stages.model.tiny import ensure_tiny_checkpoint

    if model == "tiny":
        return LlamaForCausalLM.from_pretrained(str(ensure_tiny_checkpoint()), dtype=torch.float32).eval()
    if model == "smollm2":  # transformers reads the same GGUF file (its own dequantization)
        from transformers import AutoModelForCausalLM

        from overlapd.stages.model.packaged import packaged_model_path

        path = packaged_model_path(SHAPES[model][0])
        return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    config = NAMED_SHAPES[model]
    with torch.device("meta"):
        m = LlamaForCausalLM(LlamaConfig.from_dict(config.to_hf_dict()))
    state = {n: torch.from_numpy(random_weight(config, n, s, seed))
             for src in param_layout(config).values() for n, s in src}
    if config.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    m.load_state_dict(state, assign=True, strict=False)
    m.tie_weights()
    m.model.rotary_emb = LlamaRotaryEmbedding(config=m.config)  # its buffers were left on "meta"
    return m.eval()


def worker_hf(model: str, batch: int, plen: int, steps: int, seed: int) -> Result:
    import torch

    m = _hf_model(model, seed)
    bos = m.config.bos_token_id or 0
    ids = torch.tensor(prompts(batch, plen, bos))
    with torch.inference_mode():
        t = time.perf_counter()
        out = m(ids, use_cache=True)
        prefill = (time.perf_counter() - t) * 1e3
        nxt = out.logits[:, -1].argmax(-1)
        past, tokens, times = out.past_key_values, [nxt.tolist()], []
        for _ in range(steps):
            t = time.perf_counter()
            out = m(nxt[:, None], past_key_values=past, use_cache=True)
            nxt = out.logits[:, -1].argmax(-1)
            tokens.append(nxt.tolist())  # .tolist() waits for the step, as our read-back does
            times.append((time.perf_counter() - t) * 1e3)
            past = out.past_key_values
    return Result(prefill, times, [list(col) for col in zip(*tokens)])


def worker_numpy(model: str, batch: int, plen: int, steps: int, seed: int) -> Result:
    from overlapd.stages.model.reference import reference_logits
    from overlapd.stages.model.tiny import tiny_checkpoint

    config, weights, _ = tiny_checkpoint()
    seqs = prompts(batch, plen, config.bos_token_id or 0)
    times = []
    for _ in range(steps + 1):  # the first is the prefill
        t = time.perf_counter()
        for s in seqs:
            s.append(int(np.argmax(reference_logits(config, weights, s)[-1])))
        times.append((time.perf_counter() - t) * 1e3)
    return Result(times[0], times[1:], [s[plen:] for s in seqs])


def run_baseline(kind: str, model: str, batch: int, plen: int, steps: int, seed: int, threads: int) -> Result:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    cmd = [sys.executable, __file__, "--worker", kind, "--models", model, "--batches", str(batch),
           "--prompt-len", str(plen), "--steps", str(steps), "--seed", str(seed), "--threads", str(threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    if out.returncode != 0:
        raise RuntimeError(f"baseline {kind} failed:\n{out.stderr[-3000:]}")
    d = json.loads(out.stdout.strip().splitlines()[-1])
    return Result(d["prefill_ms"], d["step_ms"], d["tokens"])


def pick_baseline(requested: str, model: str) -> str | None:
    has_hf = all(importlib.util.find_spec(m) is not None for m in ("torch", "transformers"))
    if requested == "auto":
        requested = "hf" if has_hf else "numpy"
    if requested == "hf" and not has_hf:
        sys.exit("baseline 'hf' needs torch and transformers: pip install torch==2.13.0 transformers")
    if requested == "numpy" and model != "tiny":
        return None  # full recompute of a 1B model per token would take hours
    return None if requested == "none" else requested


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="tiny,llama-3.2-1b")
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=0, help="runs per side (0: 3 for tiny, 1 for 1B)")
    ap.add_argument("--baseline", choices=("auto", "hf", "numpy", "none"), default="auto")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="BLAS threads for both sides (0: the runtime's choice)")
    ap.add_argument("--worker", choices=("hf", "numpy"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        if a.worker == "hf":
            import torch

            torch.set_num_threads(a.threads)
        r = (worker_hf if a.worker == "hf" else worker_numpy)(a.models, int(a.batches), a.prompt_len, a.steps, a.seed)
        print(json.dumps({"prefill_ms": r.prefill_ms, "step_ms": r.step_ms, "tokens": r.tokens}))
        return
    import overlapd.stages.runtime.paddle_ops  # noqa: F401  (sets the BLAS threading defaults)

    threads = a.threads or int(os.environ["MKL_NUM_THREADS"])
    os.environ["MKL_NUM_THREADS"] = str(threads)
    print(f"# host: {os.cpu_count()} cores, {threads} BLAS thread(s) each side; prompt {a.prompt_len} tokens, "
          f"{a.steps} greedy decode steps; float32", flush=True)
    header = (f"{'model':14s} {'batch':>5s} {'prefill ms':>11s} {'step ms':>9s} {'tok/s':>8s} | "
              f"{'baseline':8s} {'prefill ms':>11s} {'step ms':>9s} {'tok/s':>8s} | {'speedup':>7s} {'same tokens':>11s}")
    rows, cache = [header, "-" * len(header)], {}
    for model in a.models.split(","):
        kind = pick_baseline(a.baseline, model)
        for batch in (int(b) for b in a.batches.split(",")):
            repeats = a.repeats or (3 if model == "tiny" else 1)
            ours, base = [], []
            for _ in range(repeats):  # alternate, so both sides see similar host load
                ours.append(run_engine(model, batch, a.prompt_len, a.steps, cache))
                if kind:
                    base.append(run_baseline(kind, model, batch, a.prompt_len, a.steps, a.seed, threads))
            o = min(ours, key=lambda r: r.median_ms)
            line = f"{model:14s} {batch:5d} {o.prefill_ms:11.1f} {o.median_ms:9.2f} {batch * 1e3 / o.median_ms:8.1f} | "
            if base:
                b = min(base, key=lambda r: r.median_ms)
                same = np.mean([x == y for so, sb in zip(o.tokens, b.tokens) for x, y in zip(so, sb)])
                line += (f"{kind:8s} {b.prefill_ms:11.1f} {b.median_ms:9.2f} {batch * 1e3 / b.median_ms:8.1f} | "
                         f"{b.median_ms / o.median_ms:6.2f}x {same:10.0%}")
            else:
                line += f"{'(none)':8s}"
            rows.append(line)
            print(line, flush=True)
    print("\n".join(["", *rows]))


if __name__ == "__main__":
    main()
