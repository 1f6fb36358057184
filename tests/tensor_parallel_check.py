"""Tensor parallelism on the CPU with gloo, run by tests/test_tensor_parallel.py in
a subprocess (torch must not share the test process with Paddle).

    python tests/tensor_parallel_check.py engine MODEL PROMPTS TOKENS [--more]  # N=1 vs N=2, LLMEngine
    python tests/tensor_parallel_check.py layers DIR     # a sharded model's layers with real collectives

Prints one JSON line (the last) with what it found; the test asserts on it.
"""

from __future__ import annotations

import json
import multiprocessing
import sys
from msgspec.structs import replace
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from overlapd.stages.engine.config import EngineConfig
from overlapd.stages.engine.llm_engine import LLMEngine
from overlapd.stages.parallel.group import destroy_group
from overlapd.stages.step_types import SamplingParams

PROMPTS = ["Hello there", "The quick brown fox jumps over", "Once upon a time, in a land", "1 2 3 4 5 6"]
GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)


def engine_config(model: str, size: int, **kw: Any) -> EngineConfig:
    return EngineConfig(model=model, runtime="torch", tensor_parallel_size=size, max_num_seqs=8,
                        max_num_batched_tokens=64, max_model_len=256, **kw)


def generate(engine: LLMEngine, params: list[SamplingParams], *, overlap: bool = True) -> dict[str, Any]:
    engine.overlap = overlap  # between generate() calls no step is in flight
    results = engine.generate(PROMPTS[: len(params)], params)
    out: dict[str, Any] = {"tokens": [r.token_ids for r in results]}
    if any(p.logprobs for p in params):
        out["logprobs"] = [[lp.logprob for lp in r.logprobs or []] for r in results]
    return out


def check_engine(model: str, prompts: int, max_tokens: int, more: bool) -> dict[str, Any]:
    # One intra-op thread per rank and for N = 1 alike: two ranks on two cores,
    # and two threads fighting over one core are many times slower here.
    torch.set_num_threads(1)
    greedy = [replace(GREEDY, max_tokens=max_tokens)] * prompts
    # seeded sampling with logprobs: every rank must draw the same token, or the
    # workers' next inputs (their own prev_sampled) would go astray
    sampled = [SamplingParams(temperature=0.8, top_p=0.9, top_k=50, seed=11 + i, max_tokens=16, ignore_eos=True,
                              logprobs=3) for i in range(3)]
    r: dict[str, Any] = {}
    for size in (1, 2):
        engine = LLMEngine(engine_config(model, size))
        try:
            r[f"n{size}"] = generate(engine, greedy)["tokens"]
            if size == 2:
                r["n2_sync"] = generate(engine, greedy[:2], overlap=False)["tokens"]  # launch, collect, in order
                assert engine.parallel is not None
                r["tp_steps"] = engine.parallel.steps
                r["kv_heads_rank0"] = engine.loaded.model.num_kv_heads
            if more:
                s = generate(engine, sampled)
                r[f"sampled_n{size}"], r[f"sampled_lp_n{size}"] = s["tokens"], s["logprobs"]
        finally:
            engine.close()
    if more:
        r["sampled_logprob_err"] = max(abs(x - y) for a, b in zip(r["sampled_lp_n1"], r["sampled_lp_n2"])
                                       for x, y in zip(a, b))
        # speculative decoding (ngram): the verify batch goes to the workers too
        engine = LLMEngine(engine_config(model, 2, speculative="ngram", num_speculative_tokens=3), overlap=True)
        try:
            r["spec_n2"] = generate(engine, greedy)["tokens"]
            assert engine.spec is not None
            r["spec_stats"] = engine.spec.stats.snapshot()
        finally:
            engine.close()
    return r


# --- layers: rank 0 here, rank 1 spawned, both running the same calls ---------------------

def _layers(rank: int, size: int, port: int, model_dir: str) -> dict[str, Any] | None:
    from overlapd.stages.model.loader import load_model
    from overlapd.stages.model.paged_metadata import build_attention_metadata
    from overlapd.stages.parallel.group import init_group, join_store
    from overlapd.stages.parallel.sharding import Shard
    from overlapd.stages.runtime import load_runtime

    torch.set_num_threads(1)
    cfg = EngineConfig(model=model_dir, runtime="torch", max_model_len=64)
    ops = load_runtime("torch", "cpu")
    store = _STORE if rank == 0 else join_store(port, size)
    ops.use_process_group(init_group(store, rank, size, "cpu"))
    sharded = load_model(cfg, ops, Shard(rank, size)).model
    config = sharded.config
    ids = ops.arange(config.vocab_size)
    embedded = sharded._embed(ids)
    hidden = ops.from_numpy(np.random.default_rng(5).standard_normal((6, config.hidden_size)).astype(np.float32))
    logits = sharded.compute_logits(hidden, ops.arange(6))
    # a whole forward: one 7-token prompt in blocks 3, 1 (paged attention over this rank's KV heads)
    prompt = np.array([1, 17, 42, 99, 3, 64, 100], np.int64)
    n = len(prompt)

    def forward(model) -> np.ndarray:
        caches = model.allocate_kv_caches(num_blocks=4, block_size=4)
        meta = build_attention_metadata(
            ops, num_tokens=n, block_size=4, query_start_loc=ops.from_numpy(np.array([0, n], np.int64)),
            start_pos=ops.from_numpy(np.zeros(1, np.int64)), seq_lens=ops.from_numpy(np.array([n], np.int64)),
            row_slots=ops.from_numpy(np.zeros(1, np.int64)), block_tables=ops.from_numpy(np.array([[3, 1]])),
            query_lens_host=np.array([n]), seq_lens_host=np.array([n]))
        h = model.forward(ops.from_numpy(prompt), meta, caches)
        return ops.to_numpy(model.compute_logits(h, ops.arange(n)))

    forward_sharded = forward(sharded)
    # Both ranks leave the collectives together, and each destroys the group before
    # its interpreter finalizes: gloo's threads may still hold work whose tensors
    # need the GIL then, which aborts the process (pytorch/pytorch#179291).
    dist.barrier()
    if rank != 0:
        return None
    whole = load_model(cfg, ops).model
    return {
        "embed_equal": bool(np.array_equal(ops.to_numpy(embedded), ops.to_numpy(whole.embed_tokens))),
        "logits_shape": list(logits.shape),
        "logits_err": float(np.abs(ops.to_numpy(logits)
                                   - ops.to_numpy(whole.compute_logits(hidden, ops.arange(6)))).max()),
        "forward_err": float(np.abs(forward_sharded - forward(whole)).max()),
        "forward_scale": float(np.abs(forward_sharded).max()),
        "q_heads": [sharded.num_q_heads, config.num_attention_heads],
        "kv_heads": [sharded.num_kv_heads, config.num_key_value_heads],
        "vocab_rows": int(sharded.embed_tokens.shape[0]),
    }


def _rank1(port: int, model_dir: str) -> None:
    try:
        _layers(1, 2, port, model_dir)
    finally:
        destroy_group()


_STORE = None


def check_layers(model_dir: str) -> dict[str, Any]:
    global _STORE
    from overlapd.stages.parallel.group import open_store

    _STORE = open_store(2)
    worker = multiprocessing.get_context("spawn").Process(target=_rank1, args=(_STORE.port, model_dir))
    worker.start()
    try:
        r = _layers(0, 2, _STORE.port, model_dir)
    finally:
        worker.join(60)
        destroy_group()
    assert r is not None
    r["worker_exit"] = worker.exitcode
    return r


def main() -> None:
    mode, target = sys.argv[1], sys.argv[2]
    if mode == "engine":  # engine MODEL PROMPTS MAX_TOKENS [--more]
        r = check_engine(target, int(sys.argv[3]), int(sys.argv[4]), more="--more" in sys.argv)
    elif mode == "layers":
        r = check_layers(target)
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    print(json.dumps(r))


if __name__ == "__main__":
    main()
