"""A Llama-family GGUF file as a model source: its config, its weights, its tokenizer metadata.

The `gguf` package reads the file (memory-mapped) and dequantizes; this module
only maps llama.cpp's names and conventions onto ours:

- tensor names: `blk.N.attn_q.weight` is `model.layers.N.self_attn.q_proj.weight`;
- llama.cpp's converter permutes the rows of q and k so that its RoPE can
  rotate adjacent pairs; our RoPE (like Hugging Face's) rotates the two halves
  of each head, so those rows are put back in the order the checkpoint had;
- a file without `output.weight` ties the LM head to the embedding;
- Llama 3.1-style RoPE scaling is stored as a `rope_freqs.weight` tensor of
  per-frequency divisors, not as parameters: we recognise the standard
  parameter sets by recomputing their divisors (`_rope_scaling`).

Weights are dequantized one tensor at a time, as the loader asks for them, so
peak host memory is one float32 tensor beyond the mapped file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .config import LlamaConfig, ModelConfigError, RopeScaling
from .rope import inverse_frequencies

# Tensor types we dequantize: those the tests can write (the gguf package
# quantizes them) and so check. It dequantizes the K-quants too, but cannot
# quantize them, so they stay out until a test file of them exists.
SUPPORTED_TENSOR_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")

_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_GLOBAL_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}

# The Llama 3.x RoPE scalings in use: (factor, low, high, original context).
_KNOWN_LLAMA3_SCALINGS = (
    RopeScaling(8.0, 1.0, 4.0, 8192),    # Llama 3.1
    RopeScaling(32.0, 1.0, 4.0, 8192),   # Llama 3.2
)


class GGUFError(ValueError):
    """A GGUF file this engine cannot run; the message names the key or tensor."""


def hf_to_gguf_name(hf_name: str) -> str:
    if hf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[hf_name]
    parts = hf_name.split(".", 3)  # model, layers, N, rest
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[3] in _LAYER_NAMES:
        return f"blk.{parts[2]}.{_LAYER_NAMES[parts[3]]}"
    raise KeyError(hf_name)


def permute_for_gguf(w: np.ndarray, n_heads: int) -> np.ndarray:
    """What llama.cpp's converter does to q/k rows (for writing test files)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_from_gguf(w: np.ndarray, n_heads: int) -> np.ndarray:
    """The inverse of `permute_for_gguf`: each head's rows back as [first halves, second halves]."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class GGUFCheckpoint:
    """An open GGUF file: `config`, tokenizer `metadata`, and weights by Hugging Face name."""

    def __init__(self, path: str | Path) -> None:
        import gguf  # imported here: only GGUF models pay for it

        self.path = Path(path)
        try:
            self._reader = gguf.GGUFReader(str(self.path))
        except (OSError, ValueError) as e:
            raise GGUFError(f"{self.path} is not a readable GGUF file: {e}") from None
        self._dequantize = gguf.quants.dequantize
        self.metadata: dict[str, Any] = {}
        for key, field in self._reader.fields.items():
            if key.startswith("GGUF."):
                continue
            try:
                self.metadata[key] = field.contents()
            except Exception as e:  # a field the gguf package cannot decode
                raise GGUFError(f"{self.path}: metadata key {key!r} cannot be read: {e}") from None
        self._tensors = {t.name: t for t in self._reader.tensors}
        self.config = self._config()
        self._check_tensor_types()

    # -- config -------------------------------------------------------------

    def _key(self, name: str, default: Any = None, required: bool = False) -> Any:
        arch = self.metadata.get("general.architecture")
        value = self.metadata.get(f"{arch}.{name}", default)
        if value is None and required:
            raise GGUFError(f"{self.path} lacks the metadata key {arch}.{name}")
        return value

    def _config(self) -> LlamaConfig:
        arch = self.metadata.get("general.architecture")
        if arch != "llama":
            raise GGUFError(f"{self.path}: general.architecture is {arch!r}; only 'llama' is supported")
        hidden = int(self._key("embedding_length", required=True))
        heads = int(self._key("attention.head_count", required=True))
        tokens = self.metadata.get("tokenizer.ggml.tokens")
        vocab = int(self._key("vocab_size", len(tokens) if tokens is not None else 0))
        head_dim = int(self._key("attention.key_length", hidden // heads))
        if int(self._key("rope.dimension_count", head_dim)) != head_dim:
            raise GGUFError(f"{self.path}: partial rotary embeddings (rope.dimension_count != head_dim) "
                            "are not supported")
        if self._key("rope.scaling.type", "none") not in ("none", "llama3"):
            raise GGUFError(f"{self.path}: rope.scaling.type {self._key('rope.scaling.type')!r} is not "
                            "supported (only Llama 3's, given as rope_freqs.weight)")
        theta = float(self._key("rope.freq_base", 10000.0))
        eos = [self.metadata.get(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
        try:
            return LlamaConfig(
                hidden_size=hidden,
                intermediate_size=int(self._key("feed_forward_length", required=True)),
                num_hidden_layers=int(self._key("block_count", required=True)),
                num_attention_heads=heads,
                num_key_value_heads=int(self._key("attention.head_count_kv", heads)),
                head_dim=head_dim,
                vocab_size=vocab,
                max_position_embeddings=int(self._key("context_length", 2048)),
                rms_norm_eps=float(self._key("attention.layer_norm_rms_epsilon", 1e-5)),
                rope_theta=theta,
                rope_scaling=self._rope_scaling(head_dim, theta),
                tie_word_embeddings="output.weight" not in self._tensors,
                bos_token_id=self.metadata.get("tokenizer.ggml.bos_token_id"),
                eos_token_ids=tuple(dict.fromkeys(int(i) for i in eos if i is not None)),
            )
        except ModelConfigError as e:
            raise GGUFError(f"{self.path}: {e}") from None

    def _rope_scaling(self, head_dim: int, theta: float) -> RopeScaling | None:
        t = self._tensors.get("rope_freqs.weight")
        if t is None:
            return None
        divisors = np.asarray(self._dequantize(t.data, t.tensor_type), dtype=np.float64).reshape(-1)
        base = inverse_frequencies(head_dim, theta, None)
        for scaling in _KNOWN_LLAMA3_SCALINGS:
            ours = base / inverse_frequencies(head_dim, theta, scaling)
            if ours.shape == divisors.shape and np.allclose(ours, divisors, rtol=1e-3):
                return scaling
        raise GGUFError(f"{self.path}: rope_freqs.weight matches none of the Llama 3 RoPE scalings "
                        f"this engine knows (factors {[s.factor for s in _KNOWN_LLAMA3_SCALINGS]})")

    def _check_tensor_types(self) -> None:
        odd = sorted({t.tensor_type.name for t in self._tensors.values()} - set(SUPPORTED_TENSOR_TYPES))
        if odd:
            raise GGUFError(f"{self.path}: tensor types {odd} are not supported "
                            f"(supported: {', '.join(SUPPORTED_TENSOR_TYPES)})")

    # -- weights (the loader's _WeightSource) -------------------------------

    def shapes(self) -> dict[str, tuple[int, ...]]:
        hf_names = list(_GLOBAL_NAMES) + [f"model.layers.{n}.{k}" for n in range(self.config.num_hidden_layers)
                                          for k in _LAYER_NAMES]
        out: dict[str, tuple[int, ...]] = {}
        for hf in hf_names:
            t = self._tensors.get(hf_to_gguf_name(hf))
            if t is not None:  # GGUF lists dimensions fastest-first
                out[hf] = tuple(int(d) for d in reversed(t.shape))
        return out

    def get(self, hf_name: str) -> np.ndarray:
        t = self._tensors[hf_to_gguf_name(hf_name)]
        w = np.asarray(self._dequantize(t.data, t.tensor_type), dtype=np.float32)
        w = w.reshape(tuple(int(d) for d in reversed(t.shape)))
        cfg = self.config
        if hf_name.endswith("self_attn.q_proj.weight"):
            w = unpermute_from_gguf(w, cfg.num_attention_heads)
        elif hf_name.endswith("self_attn.k_proj.weight"):
            w = unpermute_from_gguf(w, cfg.num_key_value_heads)
        return w

    @property
    def chat_template(self) -> str | None:
        t = self.metadata.get("tokenizer.chat_template")
        return t if isinstance(t, str) and t.strip() else None


__all__ = ["GGUFCheckpoint", "GGUFError", "SUPPORTED_TENSOR_TYPES", "hf_to_gguf_name",
           "permute_for_gguf", "unpermute_from_gguf"]
