"""How long a sequence may get and how many KV blocks the cache holds.

The engine decides both from EngineConfig and the model's config; the loader
(RoPE tables) and the runner (block tables) use the same answers.
"""

from __future__ import annotations

from ..model.config import LlamaConfig
from ..parallel.sharding import max_kv_heads_per_rank
from .config import EngineConfig

DEFAULT_MAX_MODEL_LEN_CAP = 4096
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def resolve_max_model_len(cfg: EngineConfig, config: LlamaConfig) -> int:
    if cfg.max_model_len < 0:
        raise ValueError(f"max_model_len must be >= 0 (0 = the model's own), got {cfg.max_model_len}")
    if cfg.max_model_len > config.max_position_embeddings:
        raise ValueError(
            f"max_model_len {cfg.max_model_len} exceeds the model's max_position_embeddings "
            f"{config.max_position_embeddings}")
    return cfg.max_model_len or min(config.max_position_embeddings, DEFAULT_MAX_MODEL_LEN_CAP)


def kv_block_bytes(cfg: EngineConfig, config: LlamaConfig, draft: LlamaConfig | None = None) -> int:
    """Bytes of one block across all layers, keys and values (on the rank that
    caches the most KV heads, with tensor parallelism: kv_cache_bytes bounds each
    rank's cache), with a separate draft model's block too (its cache has the
    target's block count; the draft method runs without tensor parallelism)."""
    if cfg.dtype not in _DTYPE_BYTES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPE_BYTES)}, got {cfg.dtype!r}")
    heads = max_kv_heads_per_rank(config, cfg.tensor_parallel_size)
    per_token = 2 * config.num_hidden_layers * heads * config.head_dim
    if draft is not None:
        per_token += 2 * draft.num_hidden_layers * draft.num_key_value_heads * draft.head_dim
    return per_token * cfg.block_size * _DTYPE_BYTES[cfg.dtype]


def kv_cache_num_blocks(cfg: EngineConfig, config: LlamaConfig, draft: LlamaConfig | None = None) -> int:
    """cfg.num_blocks if set; else enough for max_num_seqs full-length
    requests, capped by kv_cache_bytes (the target's cache and a separate
    draft model's, `draft`, together). Never fewer than one full request."""
    if cfg.block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {cfg.block_size}")
    per_seq = -(-resolve_max_model_len(cfg, config) // cfg.block_size)
    if cfg.num_blocks:
        if cfg.num_blocks < per_seq:
            raise ValueError(
                f"num_blocks {cfg.num_blocks} cannot hold one request of max_model_len tokens "
                f"({per_seq} blocks of {cfg.block_size})")
        return cfg.num_blocks
    n = min(cfg.max_num_seqs * per_seq, cfg.kv_cache_bytes // kv_block_bytes(cfg, config, draft))
    if n < per_seq:
        raise ValueError(
            f"kv_cache_bytes {cfg.kv_cache_bytes} holds {n} blocks, fewer than one request of "
            f"max_model_len tokens needs ({per_seq}); raise kv_cache_bytes or lower max_model_len")
    return n
