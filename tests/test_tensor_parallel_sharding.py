"""Which slice of the model each tensor-parallel rank holds (stages/parallel/sharding.py).

Pure numpy: the ranks' slices, put back together the way the collectives do
(a sum for row-parallel outputs and the masked embedding lookup, a
concatenation for the logits), must give the unsharded results. The same
layers with real gloo collectives run in tests/tensor_parallel_check.py.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from overlapd.stages.engine.config import EngineConfig
from overlapd.stages.engine.sizing import kv_block_bytes
from overlapd.stages.model.config import NAMED_SHAPES, LlamaConfig
from overlapd.stages.model.llama import param_layout
from overlapd.stages.model.random_weights import random_weight
from overlapd.stages.parallel.sharding import (
    Shard, even_split, max_kv_heads_per_rank, padding_rows, plan_shard, take,
)

# SmolLM2-135M's attention: 9 query heads over 3 KV heads (groups of 3)
SMOL = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                   num_key_value_heads=3, head_dim=64, vocab_size=49152, max_position_embeddings=8192,
                   tie_word_embeddings=True)
# small enough for whole weight matrices, with SmolLM2's head counts and an odd vocabulary
SMALL = replace(SMOL, hidden_size=24, intermediate_size=30, num_hidden_layers=1, head_dim=4, vocab_size=101)


def plans(config: LlamaConfig, size: int):
    return [plan_shard(config, Shard(r, size)) for r in range(size)]


def test_even_split_puts_the_longer_runs_first() -> None:
    assert [len(r) for r in even_split(3, 2)] == [2, 1]
    assert [len(r) for r in even_split(10, 4)] == [3, 3, 2, 2]
    assert [list(r) for r in even_split(5, 5)] == [[0], [1], [2], [3], [4]]


def test_two_ranks_split_smollm2s_three_kv_heads_unevenly_by_whole_groups() -> None:
    a, b = plans(SMOL, 2)
    assert (list(a.kv_heads), list(b.kv_heads)) == ([0, 1], [2])
    assert (list(a.q_heads), list(b.q_heads)) == ([0, 1, 2, 3, 4, 5], [6, 7, 8])
    assert (len(a.intermediate), len(b.intermediate)) == (768, 768)
    assert a.vocab == range(0, 24576) and b.vocab == range(24576, 49152) and a.vocab_padding == 0
    assert max_kv_heads_per_rank(SMOL, 2) == 2


@pytest.mark.parametrize("config,size", [(SMOL, 2), (SMOL, 3), (SMOL, 4), (SMOL, 5), (SMOL, 9),
                                         (NAMED_SHAPES["llama-3.1-8b"], 2), (NAMED_SHAPES["llama-3.1-8b"], 16),
                                         (NAMED_SHAPES["llama-3.2-3b"], 5)])
def test_every_query_head_is_computed_once_next_to_its_kv_head(config: LlamaConfig, size: int) -> None:
    group = config.num_attention_heads // config.num_key_value_heads
    held = [q for p in plans(config, size) for q in p.q_heads]
    assert held == list(range(config.num_attention_heads))  # each once, in rank order (o_proj's columns)
    for p in plans(config, size):
        assert len(p.q_heads) >= 1 and len(p.kv_heads) >= 1
        # a rank's grouping is uniform: local q head j reads local KV head j // (Hq_local / Hk_local)
        assert len(p.q_heads) % len(p.kv_heads) == 0
        local_group = len(p.q_heads) // len(p.kv_heads)
        for j, q in enumerate(p.q_heads):
            assert q // group == p.kv_heads[j // local_group]


def test_more_ranks_than_kv_heads_replicate_each_kv_head() -> None:
    ps = plans(SMOL, 4)  # 3 KV heads, 4 ranks: head 0 on two ranks, which split its 3 query heads
    assert [list(p.kv_heads) for p in ps] == [[0], [0], [1], [2]]
    assert [list(p.q_heads) for p in ps] == [[0, 1], [2], [3, 4, 5], [6, 7, 8]]
    assert max_kv_heads_per_rank(SMOL, 4) == 1
    ps = plans(SMOL, 9)  # one query head per rank, each rank caches that head's KV head
    assert [p.kv_heads[0] for p in ps] == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_more_ranks_than_query_heads_is_refused() -> None:
    with pytest.raises(ValueError, match="exceeds the model's 9 attention heads"):
        plan_shard(SMOL, Shard(0, 10))


def weights(config: LlamaConfig) -> dict[str, np.ndarray]:
    return {name: random_weight(config, name, shape, 7) for sources in param_layout(config).values()
            for name, shape in sources}


def shard_of(config: LlamaConfig, w: dict[str, np.ndarray], plan) -> dict[str, np.ndarray]:
    out = {}
    for name, a in w.items():
        part = take(plan, config, name, a)
        pad = padding_rows(plan, name)
        out[name] = np.concatenate([part, np.zeros((pad, part.shape[1]), a.dtype)]) if pad else part
    return out


def attention_out(config: LlamaConfig, w: dict[str, np.ndarray], x: np.ndarray, q_heads: int,
                  kv_heads: int) -> np.ndarray:
    """One token attending to itself only (softmax of one score is 1): o_proj(v of each q head's KV head)."""
    d, pre = config.head_dim, "model.layers.0."
    v = (x @ w[pre + "self_attn.v_proj.weight"].T).reshape(kv_heads, d)
    per_q = np.repeat(v, q_heads // kv_heads, axis=0).reshape(-1)
    return per_q @ w[pre + "self_attn.o_proj.weight"].T


def mlp_out(w: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    pre = "model.layers.0.mlp."
    g, u = x @ w[pre + "gate_proj.weight"].T, x @ w[pre + "up_proj.weight"].T
    return (g / (1 + np.exp(-g)) * u) @ w[pre + "down_proj.weight"].T


@pytest.mark.parametrize("size", [1, 2, 3, 4, 6])
def test_the_ranks_slices_summed_or_joined_give_the_unsharded_layers(size: int) -> None:
    config = SMALL
    w = weights(config)
    ps = plans(config, size)
    shards = [shard_of(config, w, p) for p in ps]
    rng = np.random.default_rng(3)
    x = rng.standard_normal(config.hidden_size).astype(np.float64)
    # row-parallel outputs: the all-reduce's sum over ranks
    attn = sum(attention_out(config, s, x, len(p.q_heads), len(p.kv_heads)) for s, p in zip(shards, ps))
    np.testing.assert_allclose(attn, attention_out(config, w, x, 9, 3), rtol=1e-10, atol=1e-12)
    mlp = sum(mlp_out(s, x) for s in shards)
    np.testing.assert_allclose(mlp, mlp_out(w, x), rtol=1e-10, atol=1e-12)
    # vocabulary-parallel embedding: each rank's masked lookup, summed
    ids = np.arange(config.vocab_size)
    table = w["model.embed_tokens.weight"]
    summed = np.zeros((len(ids), config.hidden_size), table.dtype)
    for s, p in zip(shards, ps):
        mine = (ids >= p.vocab.start) & (ids < p.vocab.stop)
        local = np.where(mine, ids - p.vocab.start, 0)
        summed += s["model.embed_tokens.weight"][local] * mine[:, None]
    np.testing.assert_array_equal(summed, table)
    # vocabulary-parallel head: equal-width local logits, joined in rank order, padding dropped
    head = "model.embed_tokens.weight" if config.tie_word_embeddings else "lm_head.weight"
    local_logits = [s[head] @ x for s in shards]
    assert len({len(part) for part in local_logits}) == 1
    assert all(p.gathered_vocab == sum(len(part) for part in local_logits) for p in ps)
    joined = np.concatenate(local_logits)[: config.vocab_size]
    np.testing.assert_allclose(joined, w[head] @ x, rtol=1e-12)


def test_norms_are_whole_on_every_rank_and_slices_are_views() -> None:
    w = weights(SMALL)
    p = plan_shard(SMALL, Shard(1, 2))
    name = "model.layers.0.input_layernorm.weight"
    assert take(p, SMALL, name, w[name]) is w[name]
    q = take(p, SMALL, "model.layers.0.self_attn.q_proj.weight", w["model.layers.0.self_attn.q_proj.weight"])
    assert q.base is not None and q.shape == (3 * SMALL.head_dim, SMALL.hidden_size)


def test_each_ranks_kv_cache_is_sized_for_the_most_heads_one_rank_holds() -> None:
    one = EngineConfig(model="tiny", runtime="torch")
    two = EngineConfig(model="tiny", runtime="torch", tensor_parallel_size=2)
    assert kv_block_bytes(two, SMOL) * 3 == kv_block_bytes(one, SMOL) * 2  # heads [2, 1]: the rank with 2


def test_tensor_parallel_needs_the_torch_runtime_and_a_sane_size() -> None:
    with pytest.raises(ValueError, match="needs the torch runtime"):
        EngineConfig(model="tiny", runtime="paddle", tensor_parallel_size=2)
    with pytest.raises(ValueError, match="tensor_parallel_size must be between 1"):
        EngineConfig(model="tiny", runtime="torch", tensor_parallel_size=0)
    EngineConfig(model="tiny", runtime="paddle", tensor_parallel_size=1)
