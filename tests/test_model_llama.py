"""The paged, batched Llama forward against the plain numpy reference (no KV cache)."""

from __future__ import annotations

import numpy as np

from engine_test_support import (
    GREEDY, Driver, Req, get_ops, make_runner, reference_greedy_tokens, tiny_cache, tiny_in_memory,  # noqa: F401
    tiny_loaded,
)
from overlapd.stages.model.paged_metadata import build_attention_metadata
from overlapd.stages.model.reference import reference_logits
from overlapd.stages.step_types import SamplingParams

PROMPTS = [
    [0, 424, 13, 314, 338, 15],  # 6 tokens
    [0, 370, 321, 301],  # 4: exactly one block
    [0, 5, 77, 123, 300, 410, 9, 66, 701, 12, 44, 99, 250, 3],  # 14: several blocks
    [0, 42],  # 2
]


def test_forward_logits_match_reference_for_every_position(tiny_loaded) -> None:
    """Two prompts in one prefill batch, scattered blocks: logits of all tokens vs the reference."""
    ops, model = get_ops(), tiny_loaded.model
    config, weights, _ = tiny_in_memory()
    bs, prompts = 4, [PROMPTS[2], PROMPTS[0]]
    caches = model.allocate_kv_caches(num_blocks=16, block_size=bs)
    tables = np.array([[9, 2, 14, 5], [7, 11, 0, 0]], np.int64)  # out of order on purpose
    qlens = np.array([len(p) for p in prompts], np.int64)
    qsl = np.concatenate([[0], np.cumsum(qlens)])
    meta = build_attention_metadata(
        ops, num_tokens=int(qsl[-1]), block_size=bs, query_start_loc=ops.from_numpy(qsl),
        start_pos=ops.from_numpy(np.zeros(2, np.int64)), seq_lens=ops.from_numpy(qlens),
        row_slots=ops.from_numpy(np.array([0, 1], np.int64)), block_tables=ops.from_numpy(tables),
        query_lens_host=qlens, seq_lens_host=qlens)
    ids = ops.from_numpy(np.concatenate(prompts).astype(np.int64))
    hidden = model.forward(ids, meta, caches)
    logits = ops.to_numpy(model.compute_logits(hidden, ops.arange(int(qsl[-1]))))
    expected = np.concatenate([reference_logits(config, weights, p) for p in prompts])
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_greedy_mixed_batch_matches_reference(tiny_loaded) -> None:
    driver = Driver(make_runner(tiny_loaded))
    reqs = [driver.add(Req(i + 1, p, SamplingParams(temperature=0.0, max_tokens=10 + i)))
            for i, p in enumerate(PROMPTS)]
    driver.run()
    for r in reqs:
        assert r.outputs == reference_greedy_tokens(r.prompt, r.params.max_tokens), r.req_id


def test_chunked_prefill_beside_decodes_matches_reference(tiny_loaded) -> None:
    """A 30-token prompt computed over several 7-token steps while others decode."""
    driver = Driver(make_runner(tiny_loaded), token_budget=7)
    short = driver.add(Req(1, PROMPTS[1], SamplingParams(temperature=0.0, max_tokens=12)))
    driver.step()  # the short prompt is decoding before the long one arrives
    long_prompt = [0] + [(i * 37) % 700 + 2 for i in range(29)]
    long = driver.add(Req(2, long_prompt, SamplingParams(temperature=0.0, max_tokens=6)))
    seen_chunks = 0
    while not (short.done and long.done):
        driver.step()
        seen_chunks += 0 < long.computed < len(long_prompt)
    assert seen_chunks >= 3, "the long prompt was not split into chunks"
    assert short.outputs == reference_greedy_tokens(short.prompt, 12)
    assert long.outputs == reference_greedy_tokens(long_prompt, 6)


def test_preempted_request_recomputes_into_new_blocks(tiny_loaded) -> None:
    runner = make_runner(tiny_loaded)
    driver = Driver(runner)
    victim = driver.add(Req(1, PROMPTS[2], SamplingParams(temperature=0.0, max_tokens=14)))
    other = driver.add(Req(2, PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=14)))
    for _ in range(5):
        driver.step()
    old_blocks = list(victim.blocks)
    driver.preempt(victim.req_id)  # its KV is dropped; the next step recomputes prompt + outputs
    driver.free_blocks = old_blocks + [b for b in driver.free_blocks if b not in old_blocks]
    driver.step()
    assert victim.computed == len(victim.prompt) + 5 and not set(victim.blocks) & set(old_blocks)
    driver.run()
    assert victim.outputs == reference_greedy_tokens(victim.prompt, 14)
    assert other.outputs == reference_greedy_tokens(other.prompt, 14)


def test_overlap_mode_gives_the_same_tokens_as_sync(tiny_loaded) -> None:
    """Decode inputs taken from the previous launch's device output (from_prev_step)."""
    def run(overlap: bool) -> list[list[int]]:
        driver = Driver(make_runner(tiny_loaded), token_budget=9)
        reqs = [driver.add(Req(i + 1, p, SamplingParams(temperature=0.0 if i % 2 else 0.9, top_p=0.9,
                                                        max_tokens=8 + i), seed=100 + i))
                for i, p in enumerate(PROMPTS)]
        driver.run_overlapped() if overlap else driver.run()
        return [r.outputs for r in reqs]

    sync = run(False)
    assert run(True) == sync
    assert sync[1] == reference_greedy_tokens(PROMPTS[1], 9)


def test_deep_tied_llama3_shape_matches_reference() -> None:
    """The 1B's features at small width: tied embeddings, Llama 3 RoPE scaling,
    4 query heads per kv head, 12 layers, a prompt past the rope's low-frequency band."""
    from dataclasses import replace

    from overlapd.stages.model.config import NAMED_SHAPES
    from overlapd.stages.model.llama import param_layout
    from overlapd.stages.model.loader import build_model
    from overlapd.stages.model.random_weights import random_weight

    config = replace(NAMED_SHAPES["llama-3.2-1b"], hidden_size=128, intermediate_size=256, num_hidden_layers=12,
                     num_attention_heads=8, num_key_value_heads=2, head_dim=16, vocab_size=600,
                     bos_token_id=1, eos_token_ids=(2,))
    weights = {n: random_weight(config, n, s, 7) for src in param_layout(config).values() for n, s in src}
    ops, bs = get_ops(), 16
    model = build_model(config, weights, ops, max_model_len=256)
    prompt = [1] + [(i * 53) % 590 + 5 for i in range(39)]
    caches = model.allocate_kv_caches(num_blocks=4, block_size=bs)
    n = np.array([len(prompt)], np.int64)
    meta = build_attention_metadata(
        ops, num_tokens=len(prompt), block_size=bs, query_start_loc=ops.from_numpy(np.array([0, len(prompt)])),
        start_pos=ops.from_numpy(np.zeros(1, np.int64)), seq_lens=ops.from_numpy(n),
        row_slots=ops.from_numpy(np.zeros(1, np.int64)), block_tables=ops.from_numpy(np.array([[3, 0, 2, 1]])),
        query_lens_host=n, seq_lens_host=n)
    hidden = model.forward(ops.from_numpy(np.array(prompt, np.int64)), meta, caches)
    logits = ops.to_numpy(model.compute_logits(hidden, ops.arange(len(prompt))))
    expected = reference_logits(config, weights, prompt)
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
