"""A plain Llama forward in numpy float64: no KV cache, no paging, no batching.

The correctness oracle for the engine (tests) and the "straightforward
implementation" the bench falls back to. It follows the Hugging Face code
path literally (HF tensor names, repeat_kv, rotate_half on cat(freqs, freqs),
an explicit causal mask) so it shares nothing with the paged model but the
RoPE frequency formula.
"""

from __future__ import annotations

import numpy as np

from .config import LlamaConfig
from .rope import inverse_frequencies


def _rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def _rotate_half(x: np.ndarray) -> np.ndarray:
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def _silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def reference_logits(config: LlamaConfig, weights: dict[str, np.ndarray], token_ids: list[int]) -> np.ndarray:
    """float64 logits [len(token_ids), vocab] for every position of one sequence."""
    c = config
    w = {k: np.asarray(v, dtype=np.float64) for k, v in weights.items()}
    n = len(token_ids)
    x = w["model.embed_tokens.weight"][np.asarray(token_ids)]
    inv = inverse_frequencies(c.head_dim, c.rope_theta, c.rope_scaling)
    freqs = np.arange(n, dtype=np.float64)[:, None] * inv[None, :]
    emb = np.concatenate([freqs, freqs], axis=-1)  # [n, head_dim]
    cos, sin = np.cos(emb)[None], np.sin(emb)[None]  # broadcast over heads
    causal = np.triu(np.full((n, n), -np.inf), k=1)
    groups = c.num_attention_heads // c.num_key_value_heads
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        hn = _rms_norm(x, w[p + "input_layernorm.weight"], c.rms_norm_eps)
        q = (hn @ w[p + "self_attn.q_proj.weight"].T).reshape(n, c.num_attention_heads, c.head_dim)
        k = (hn @ w[p + "self_attn.k_proj.weight"].T).reshape(n, c.num_key_value_heads, c.head_dim)
        v = (hn @ w[p + "self_attn.v_proj.weight"].T).reshape(n, c.num_key_value_heads, c.head_dim)
        q, k, v = q.transpose(1, 0, 2), k.transpose(1, 0, 2), v.transpose(1, 0, 2)  # heads first
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        k, v = np.repeat(k, groups, axis=0), np.repeat(v, groups, axis=0)  # HF repeat_kv
        scores = q @ k.transpose(0, 2, 1) / np.sqrt(c.head_dim) + causal
        scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
        probs = scores / scores.sum(axis=-1, keepdims=True)
        attn = (probs @ v).transpose(1, 0, 2).reshape(n, c.q_size)
        x = x + attn @ w[p + "self_attn.o_proj.weight"].T
        hn = _rms_norm(x, w[p + "post_attention_layernorm.weight"], c.rms_norm_eps)
        mlp = _silu(hn @ w[p + "mlp.gate_proj.weight"].T) * (hn @ w[p + "mlp.up_proj.weight"].T)
        x = x + mlp @ w[p + "mlp.down_proj.weight"].T
    x = _rms_norm(x, w["model.norm.weight"], c.rms_norm_eps)
    head = w["model.embed_tokens.weight"] if c.tie_word_embeddings else w["lm_head.weight"]
    return x @ head.T


def reference_greedy(config: LlamaConfig, weights: dict[str, np.ndarray], prompt: list[int], n: int) -> list[int]:
    """n greedy tokens after `prompt`, recomputing the whole sequence for each."""
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(np.argmax(reference_logits(config, weights, ids)[-1])))
    return ids[len(prompt):]


def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
