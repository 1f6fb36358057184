"""A `tokenizers.Tokenizer` built from a GGUF file's tokenizer metadata.

A GGUF carries no tokenizer.json: it lists the vocabulary, the merges, each
token's type and the special ids under llama.cpp's keys. For byte-level BPE
vocabularies (`tokenizer.ggml.model = "gpt2"`: SmolLM, Llama 3, GPT-2 style)
that is everything a `tokenizers` BPE model needs; the pre-tokenizer's split
pattern is named by `tokenizer.ggml.pre`.

We build it here with the `tokenizers` library instead of taking transformers
(several hundred MB, slow to import) as a runtime dependency for this one
conversion. The tests check that our ids equal transformers' GGUF tokenizer's.
Sentencepiece vocabularies (`llama`: Llama 1/2, Mistral) are not built yet;
such a file gets a clear error.
"""

from __future__ import annotations

from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer

# llama.cpp's token types (llama_token_type): what is special text, what is a plain added token.
_CONTROL, _USER_DEFINED = 3, 4

# The split pattern that goes with `tokenizer.ggml.pre`, where it is not GPT-2's own
# (GPT-2's is the ByteLevel pre-tokenizer's built-in regex).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLITS = {"llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT,
           "smaug-bpe": _LLAMA3_SPLIT, "dbrx": _LLAMA3_SPLIT}


def _byte_alphabet() -> set[str]:
    return set(pre_tokenizers.ByteLevel.alphabet())


def tokenizer_from_gguf(meta: dict[str, Any]) -> HFTokenizer:
    """The tokenizer a GGUF's metadata describes; ValueError names what is missing or unsupported."""
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"tokenizer.ggml.model {kind!r} is not supported yet (only byte-level BPE, 'gpt2')")
    tokens: list[str] = list(meta.get("tokenizer.ggml.tokens") or [])
    merges_raw = meta.get("tokenizer.ggml.merges")
    if not tokens or merges_raw is None:
        raise ValueError("the file lacks tokenizer.ggml.tokens or tokenizer.ggml.merges")
    vocab = {tok: i for i, tok in enumerate(tokens)}
    merges = [tuple(m.split(" ", 1)) for m in merges_raw]
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, ignore_merges=False))

    split = _SPLITS.get(meta.get("tokenizer.ggml.pre", ""))
    if split is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    tok.decoder = decoders.ByteLevel()

    # Control tokens (<|im_start|>, <|endoftext|>) match whole and are special;
    # user-defined ones match whole but are ordinary text. A "control" token
    # spelled outside the byte alphabet is a converter's mislabel: skip it.
    types = list(meta.get("tokenizer.ggml.token_type") or [])
    alphabet = _byte_alphabet()
    special = [AddedToken(t, normalized=False, special=True)
               for t, ty in zip(tokens, types) if ty == _CONTROL and set(t) <= alphabet]
    plain = [AddedToken(t, normalized=False, special=False) for t, ty in zip(tokens, types) if ty == _USER_DEFINED]
    if special:
        tok.add_special_tokens(special)
    if plain:
        tok.add_tokens(plain)

    bos = meta.get("tokenizer.ggml.bos_token_id")
    if meta.get("tokenizer.ggml.add_bos_token", False) and bos is not None:
        b = tokens[int(bos)]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{b} $A", pair=f"{b} $A {b} $B", special_tokens=[(b, int(bos))])
    return tok


def special_token_text(meta: dict[str, Any], name: str) -> str:
    """The text of bos/eos as the chat template spells it ('' when the file names none)."""
    i = meta.get(f"tokenizer.ggml.{name}_token_id")
    tokens = meta.get("tokenizer.ggml.tokens") or []
    return str(tokens[int(i)]) if i is not None and 0 <= int(i) < len(tokens) else ""


__all__ = ["special_token_text", "tokenizer_from_gguf"]
