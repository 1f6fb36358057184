"""The Llama model, written once against the ops layer.

One batched forward serves a mixed step: prefill chunks and decodes are
flattened into one token axis, attention reads every row's keys from the paged
KV cache (after this step's keys were written), and logits are computed only
for each row's last token.

With a `ShardPlan` (tensor parallelism, stages/parallel/sharding.py) the
parameters are one rank's slices and the forward adds the collectives: an
all-reduce after each row-parallel matmul (o_proj, down_proj) and after the
vocabulary-parallel embedding lookup, and an all-gather of the vocabulary-
parallel logits. Without one, nothing here calls a collective.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..parallel.sharding import ShardPlan
from ..runtime.ops import FLOAT32, AttentionMetadata, Ops, Tensor
from .config import LlamaConfig
from .rope import cos_sin_tables

HFSource = tuple[str, tuple[int, ...]]  # (Hugging Face tensor name, its shape)


def param_layout(config: LlamaConfig) -> dict[str, list[HFSource]]:
    """Every model parameter and the HF tensors concatenated (along axis 0) to form it.

    q/k/v and gate/up are fused into one matrix each so a layer runs two
    matmuls fewer; the loader checks each HF tensor's shape against this.
    """
    h, i, v = config.hidden_size, config.intermediate_size, config.vocab_size
    layout: dict[str, list[HFSource]] = {"embed_tokens": [("model.embed_tokens.weight", (v, h))]}
    for n in range(config.num_hidden_layers):
        hf = f"model.layers.{n}."
        layout[f"layers.{n}.input_layernorm"] = [(hf + "input_layernorm.weight", (h,))]
        layout[f"layers.{n}.qkv_proj"] = [
            (hf + "self_attn.q_proj.weight", (config.q_size, h)),
            (hf + "self_attn.k_proj.weight", (config.kv_size, h)),
            (hf + "self_attn.v_proj.weight", (config.kv_size, h)),
        ]
        layout[f"layers.{n}.o_proj"] = [(hf + "self_attn.o_proj.weight", (h, config.q_size))]
        layout[f"layers.{n}.post_attention_layernorm"] = [(hf + "post_attention_layernorm.weight", (h,))]
        layout[f"layers.{n}.gate_up_proj"] = [
            (hf + "mlp.gate_proj.weight", (i, h)),
            (hf + "mlp.up_proj.weight", (i, h)),
        ]
        layout[f"layers.{n}.down_proj"] = [(hf + "mlp.down_proj.weight", (h, i))]
    layout["norm"] = [("model.norm.weight", (h,))]
    if not config.tie_word_embeddings:
        layout["lm_head"] = [("lm_head.weight", (v, h))]
    return layout


@dataclass(slots=True)
class _Layer:
    input_layernorm: Tensor
    qkv_proj: Tensor
    o_proj: Tensor
    post_attention_layernorm: Tensor
    gate_up_proj: Tensor
    down_proj: Tensor


class LlamaModel:
    def __init__(self, config: LlamaConfig, ops: Ops, params: dict[str, Tensor], max_positions: int,
                 shard: ShardPlan | None = None) -> None:
        missing = set(param_layout(config)) - set(params)
        if missing:
            raise ValueError(f"model parameters missing: {sorted(missing)}")
        self.config = config
        self.ops = ops
        self.params = params
        self.shard = shard
        # the heads this rank computes and caches (all of them without a shard)
        self.num_q_heads = len(shard.q_heads) if shard is not None else config.num_attention_heads
        self.num_kv_heads = len(shard.kv_heads) if shard is not None else config.num_key_value_heads
        self.embed_tokens = params["embed_tokens"]
        self.norm = params["norm"]
        self.lm_head = params["embed_tokens"] if config.tie_word_embeddings else params["lm_head"]
        self.layers = [
            _Layer(**{f: params[f"layers.{n}.{f}"] for f in _Layer.__slots__})
            for n in range(config.num_hidden_layers)
        ]
        self.dtype = ops.dtype_of(self.embed_tokens)
        self.max_positions = max_positions
        self.rope = ops.rope_tables(*cos_sin_tables(config, max_positions))
        self.scale = 1.0 / math.sqrt(config.head_dim)
        # batch-1 products with a layer's glue fused in, where the ops have them (one-token steps, unsharded)
        self.products = getattr(ops, "fused_products", None) if shard is None else None

    def allocate_kv_caches(self, num_blocks: int, block_size: int) -> list[Any]:
        c = self.config
        return [
            self.ops.allocate_kv_cache(num_blocks, block_size, self.num_kv_heads, c.head_dim, self.dtype)
            for _ in range(c.num_hidden_layers)
        ]

    def forward(self, input_ids: Tensor, meta: AttentionMetadata, kv_caches: list[Any]) -> Tensor:
        """Hidden states [T, hidden] (before the final norm) for the step's tokens."""
        ops = self.ops
        plan = ops.attention_plan(meta, kv_caches[0])  # built once, shared by every layer
        rope = ops.rope_plan(meta.positions, self.rope)
        eps = self.config.rms_norm_eps
        h = self._embed(input_ids)
        if self.products is not None and meta.num_tokens == 1:
            return self._forward_one_token(h, kv_caches, plan, rope)
        residual = None  # the running sum of the residual stream; h is each block's output
        for layer, cache in zip(self.layers, kv_caches):
            x, residual = ops.add_rms_norm(h, residual, layer.input_layernorm, eps)
            h = self._attention(x, layer, cache, meta, plan, rope)
            x, residual = ops.add_rms_norm(h, residual, layer.post_attention_layernorm, eps)
            h = self._mlp(x, layer)
        return ops.add(residual, h)

    def _forward_one_token(self, r: Tensor, kv_caches: list[Any], plan: Any, rope: Any) -> Tensor:
        """forward() for a step of one token (batch-1 decode), where the ops have
        products with a layer's glue fused in (kernels/triton_gemv.py): a layer is
        four products, RoPE + KV write and the attention (seven kernels on a GPU,
        eleven through forward()'s ops). `r`, the embedding, is the residual
        stream, updated in place by each block's last product; the same sums and
        roundings as forward() up to summation order."""
        c, eps, products = self.config, self.config.rms_norm_eps, self.products
        for layer, cache in zip(self.layers, kv_caches):
            qkv = products.norm_linear(r, layer.input_layernorm, eps, layer.qkv_proj)
            qkv = self.ops.reshape(qkv, [1, self.num_q_heads + 2 * self.num_kv_heads, c.head_dim])
            q = self.ops.rope_and_cache_kv(qkv, self.num_q_heads, self.num_kv_heads, rope, cache, plan)
            products.linear_add_(r, self.ops.paged_attention(q, cache, plan, self.scale), layer.o_proj)
            gate_up = products.norm_linear(r, layer.post_attention_layernorm, eps, layer.gate_up_proj)
            products.swiglu_linear_add_(r, gate_up, layer.down_proj)
        return r

    def compute_logits(self, hidden: Tensor, logits_indices: Tensor) -> Tensor:
        """float32 logits [R, vocab] of the tokens at `logits_indices` (each row's last)."""
        ops = self.ops
        if self.products is not None and hidden.shape[0] == 1 == logits_indices.shape[0]:
            return self.products.norm_linear(hidden, self.norm, self.config.rms_norm_eps, self.lm_head, FLOAT32)
        x = ops.rms_norm(ops.index_select(hidden, logits_indices), self.norm, self.config.rms_norm_eps)
        logits = ops.linear(x, self.lm_head)
        if self.shard is not None:  # every rank gets the whole vocabulary's logits, so all sample alike
            logits = ops.all_gather(logits, axis=-1)
            pad = self.shard.gathered_vocab - self.config.vocab_size  # the last ranks' zero rows
            if pad:
                logits = ops.split(logits, [self.config.vocab_size, pad])[0]
        return ops.cast(logits, FLOAT32)

    def _embed(self, input_ids: Tensor) -> Tensor:
        ops, s = self.ops, self.shard
        if s is None:
            return ops.embedding(input_ids, self.embed_tokens)
        # Each rank looks up the ids in its vocabulary rows and zeroes the rest;
        # the sum over ranks is the lookup (exactly: one rank adds non-zeros).
        mine = ops.logical_and(ops.ge(input_ids, s.vocab.start), ops.lt(input_ids, s.vocab.stop))
        local = ops.where(mine, ops.sub(input_ids, s.vocab.start), 0)
        h = ops.mul(ops.embedding(local, self.embed_tokens), ops.cast(ops.unsqueeze(mine, 1), self.dtype))
        ops.all_reduce_(h)
        return h

    def _reduce(self, partial: Tensor) -> Tensor:
        """A row-parallel matmul's output summed over the ranks (in place)."""
        if self.shard is not None:
            self.ops.all_reduce_(partial)
        return partial

    def _attention(self, x: Tensor, layer: _Layer, cache: Any, meta: AttentionMetadata, plan: Any,
                   rope: Any) -> Tensor:
        ops, c = self.ops, self.config
        hq, hk = self.num_q_heads, self.num_kv_heads
        qkv = ops.reshape(ops.linear(x, layer.qkv_proj), [x.shape[0], hq + 2 * hk, c.head_dim])
        q = ops.rope_and_cache_kv(qkv, hq, hk, rope, cache, plan)
        return self._reduce(ops.linear(ops.paged_attention(q, cache, plan, self.scale), layer.o_proj))

    def _mlp(self, x: Tensor, layer: _Layer) -> Tensor:
        ops = self.ops
        return self._reduce(ops.linear(ops.silu_and_mul(ops.linear(x, layer.gate_up_proj)), layer.down_proj))
