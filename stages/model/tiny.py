"""The embedded default model: a tiny Llama the project creates, no download needed.

Everything is deterministic: the byte-level BPE tokenizer is trained with the
`tokenizers` library on an embedded text (training twice gives the same
tokenizer.json; tests check it) and the weights come from a fixed-seed numpy
generator. The result is written once as a real Hugging Face checkpoint
directory (config.json, model.safetensors, tokenizer.json) under the user's
cache, so it loads through the same code path as any downloaded model.

Random weights produce gibberish. Two choices make it readable gibberish
for `overlapd generate "Hello"`: the lm_head rows of bos and eos are zero, so
their logit is exactly 0 while the largest of ~770 random logits (std ~3) is
far above it (greedy decoding never stops on eos and runs to max_tokens;
sampling stops on eos only rarely; random_weights.py); and the rows of
tokens that are not valid UTF-8 on their own (lone bytes >= 0x80, which a
real model only emits as parts of a character) are zero too, so the text
rarely shows U+FFFD.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from .config import LlamaConfig
from .llama import param_layout
from .random_weights import random_weight
from .tiny_corpus import TINY_CORPUS

# Bump whenever the weights, the config or the tokenizer recipe change: the
# cache directory is named after it, so old caches are never reused.
TINY_VERSION = 2
TINY_SEED = 20240601
TINY_VOCAB = 768
BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"


def train_tiny_tokenizer() -> Tokenizer:
    """A byte-level BPE (as GPT-2 and Llama 3 use) trained on the embedded text."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB,
        special_tokens=[BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([TINY_CORPUS], trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    # like Llama 3: encode() prepends bos
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)])
    return tok


def tiny_config(tok: Tokenizer) -> LlamaConfig:
    return LlamaConfig(
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        vocab_size=tok.get_vocab_size(),
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=tok.token_to_id(BOS),
        eos_token_ids=(tok.token_to_id(EOS),),
    )


def tiny_weights(config: LlamaConfig, tok: Tokenizer) -> dict[str, np.ndarray]:
    """The tiny model's float32 weights under their HF names."""
    w = {name: random_weight(config, name, shape, TINY_SEED)
         for sources in param_layout(config).values() for name, shape in sources}
    fragments = [i for i in range(config.vocab_size) if "\ufffd" in tok.decode([i], skip_special_tokens=False)]
    w["lm_head.weight"][fragments] = 0.0
    return w


def tiny_checkpoint() -> tuple[LlamaConfig, dict[str, np.ndarray], str]:
    """(config, HF-named weights, tokenizer.json text), all made in memory."""
    tok = train_tiny_tokenizer()
    config = tiny_config(tok)
    return config, tiny_weights(config, tok), tok.to_str()


def write_hf_checkpoint(path: Path, config: LlamaConfig, weights: dict[str, np.ndarray], tokenizer_json: str | None) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config.to_hf_dict(), indent=2) + "\n", encoding="utf-8")
    save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
    if tokenizer_json is not None:
        (path / "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")


def cache_root() -> Path:
    """Where created checkpoints live: $OVERLAPD_CACHE_DIR, systemd's
    $CACHE_DIRECTORY, $XDG_CACHE_HOME/overlapd, or ~/.cache/overlapd."""
    for var in ("OVERLAPD_CACHE_DIR", "CACHE_DIRECTORY"):
        if os.environ.get(var):
            return Path(os.environ[var].split(":")[0])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "overlapd"


_FILES = ("config.json", "model.safetensors", "tokenizer.json")


def ensure_tiny_checkpoint(root: Path | None = None) -> Path:
    """The tiny model's checkpoint directory, created on first use.

    Written to a temporary sibling and renamed into place, so a reader never
    sees a half-written directory and two processes racing both succeed.
    """
    final = (root or cache_root()) / f"tiny-v{TINY_VERSION}"
    if all((final / f).is_file() for f in _FILES):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=final.name + ".tmp-", dir=final.parent))
    try:
        write_hf_checkpoint(tmp, *tiny_checkpoint())
        if final.exists():  # an incomplete leftover: replace it
            shutil.rmtree(final, ignore_errors=True)
        try:
            os.rename(tmp, final)
        except OSError:
            if not all((final / f).is_file() for f in _FILES):
                raise  # not a lost race: a real failure
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
