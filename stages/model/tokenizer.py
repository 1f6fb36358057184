"""Tokenizers: a thin wrapper over `tokenizers.Tokenizer`, and a byte-level fallback.

Both offer the same small surface (`TokenizerLike`) so the rest of the engine
never cares which one a model came with.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, Sequence

from tokenizers import Tokenizer as HFTokenizer


class TokenizerLike(Protocol):
    vocab_size: int
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    # At most this many characters of input text become one token, so a text
    # longer than n * max_chars_per_token has more than n tokens: the daemon
    # refuses such a prompt without spending the event loop on encoding it.
    max_chars_per_token: int

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...


class Tokenizer:
    """A tokenizer.json, with the model's bos/eos ids (config.json's word wins)."""

    def __init__(self, tok: HFTokenizer, bos_token_id: int | None, eos_token_ids: tuple[int, ...]) -> None:
        self._tok = tok
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        # A token's vocabulary string is at least as long as the input it
        # stands for (byte-level BPE: one character per byte; added tokens
        # match literally), unless a normalizer shortens the input first:
        # composing characters merges at most a few into one, hence the 4.
        longest = max((len(t) for t in tok.get_vocab(with_added_tokens=True)), default=1)
        self.max_chars_per_token = longest * (1 if tok.normalizer is None else 4)
        self.bos_token_id = bos_token_id
        self.eos_token_ids = eos_token_ids

    @classmethod
    def from_file(
        cls, path: str | Path, bos_token_id: int | None = None, eos_token_ids: tuple[int, ...] = ()
    ) -> "Tokenizer":
        try:
            tok = HFTokenizer.from_file(str(path))
        except Exception as e:  # the Rust side raises a bare Exception
            raise ValueError(f"{path} is not a readable tokenizer.json: {e}") from None
        return cls(tok, bos_token_id, eos_token_ids)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_many(self, texts: list[str]) -> list[list[int]]:
        """Like encode, for several texts; unlike encode, other threads run meanwhile
        (the library releases the GIL in encode_batch, not in encode)."""
        return [e.ids for e in self._tok.encode_batch(texts)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def vocab(self) -> dict[str, int]:
        """Every token's string and id, added tokens included (two models share a
        vocabulary when these are equal)."""
        return self._tok.get_vocab(with_added_tokens=True)


class ByteTokenizer:
    """The fallback for checkpoints without tokenizer.json (dummy shapes).

    Ids 0-255 are the UTF-8 bytes of the text. Any other id that is not bos
    or eos decodes to one printable ASCII character (33 + id % 94), so a
    dummy model's random tokens still show up as visible text; encode never
    produces them. Malformed UTF-8 decodes to U+FFFD, as a BPE decoder does.
    """

    def __init__(self, vocab_size: int, bos_token_id: int | None, eos_token_ids: tuple[int, ...]) -> None:
        if vocab_size < 256:
            raise ValueError(f"a byte-level tokenizer needs a vocabulary of at least 256, got {vocab_size}")
        self.vocab_size = vocab_size
        self.bos_token_id = bos_token_id
        self.eos_token_ids = eos_token_ids
        self.max_chars_per_token = 1  # one token per UTF-8 byte, and a character is at least one byte
        self._special = set(eos_token_ids) | ({bos_token_id} if bos_token_id is not None else set())

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = list(text.encode("utf-8"))
        if add_special_tokens and self.bos_token_id is not None:
            ids.insert(0, self.bos_token_id)
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        out = bytearray()
        for i in ids:
            if i in self._special:
                if not skip_special_tokens:
                    out += b"<|special|>"
            elif 0 <= i < 256:
                out.append(i)
            else:
                out.append(33 + i % 94)
        return out.decode("utf-8", errors="replace")
