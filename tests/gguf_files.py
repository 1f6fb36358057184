"""Writing Llama GGUF files for tests, the way llama.cpp's converter lays them out.

The tiny model (config, HF-named weights, tokenizer.json) becomes a GGUF with
llama.cpp's tensor names, q/k rows permuted for its RoPE, 1-D norms in F32 and
the matrices in the tensor type asked for, quantized by the gguf package. The
loader must undo all of it; the tests compare against the original arrays.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np

from overlapd.stages.model.config import LlamaConfig
from overlapd.stages.model.gguf_checkpoint import hf_to_gguf_name, permute_for_gguf

NORMAL, CONTROL = 1, 3  # llama.cpp token types


def gguf_layout(config: LlamaConfig, name: str, w: np.ndarray) -> np.ndarray:
    """An HF tensor as llama.cpp stores it (q/k rows permuted), float32."""
    w = np.asarray(w, np.float32)
    if name.endswith("q_proj.weight"):
        return permute_for_gguf(w, config.num_attention_heads)
    if name.endswith("k_proj.weight"):
        return permute_for_gguf(w, config.num_key_value_heads)
    return w


def expected_weight(config: LlamaConfig, name: str, w: np.ndarray, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    """What a loader must return for `name` from a file written with `qtype`."""
    from overlapd.stages.model.gguf_checkpoint import unpermute_from_gguf

    stored = gguf_layout(config, name, w)
    if stored.ndim > 1 and qtype != gguf.GGMLQuantizationType.F32:
        stored = np.asarray(gguf.quants.dequantize(gguf.quants.quantize(stored, qtype), qtype), np.float32)
    if name.endswith("q_proj.weight"):
        return unpermute_from_gguf(stored, config.num_attention_heads)
    if name.endswith("k_proj.weight"):
        return unpermute_from_gguf(stored, config.num_key_value_heads)
    return stored


def write_llama_gguf(
    path: Path,
    config: LlamaConfig,
    weights: dict[str, np.ndarray],
    tokenizer_json: str,
    qtype: gguf.GGMLQuantizationType = gguf.GGMLQuantizationType.F32,
    *,
    chat_template: str | None = None,
    extra_tensors: dict[str, np.ndarray] | None = None,
    architecture: str = "llama",
) -> Path:
    w = gguf.GGUFWriter(str(path), architecture)
    w.add_name("overlapd test model")
    w.add_block_count(config.num_hidden_layers)
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv(config.num_key_value_heads)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_rope_freq_base(config.rope_theta)
    w.add_rope_dimension_count(config.head_dim)
    w.add_vocab_size(config.vocab_size)

    tok = json.loads(tokenizer_json)
    vocab: dict[str, int] = tok["model"]["vocab"]
    tokens = [""] * config.vocab_size
    types = [NORMAL] * config.vocab_size
    for t, i in vocab.items():
        tokens[i] = t
    for added in tok.get("added_tokens", []):
        tokens[added["id"]] = added["content"]
        types[added["id"]] = CONTROL if added.get("special") else NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    if config.bos_token_id is not None:
        w.add_bos_token_id(config.bos_token_id)
        w.add_add_bos_token(True)
    if config.eos_token_ids:
        w.add_eos_token_id(config.eos_token_ids[0])
    if chat_template is not None:
        w.add_chat_template(chat_template)

    for name, arr in weights.items():
        stored = gguf_layout(config, name, arr)
        if stored.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:
            w.add_tensor(hf_to_gguf_name(name), stored)
        elif qtype == gguf.GGMLQuantizationType.F16:
            w.add_tensor(hf_to_gguf_name(name), stored.astype(np.float16))
        else:
            w.add_tensor(hf_to_gguf_name(name), gguf.quants.quantize(stored, qtype), raw_dtype=qtype)
    for name, arr in (extra_tensors or {}).items():
        w.add_tensor(name, arr if arr.dtype == np.int8 else np.asarray(arr, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
