"""Incremental detokenization with stop strings, one request at a time.

Two kinds of text are held back between tokens:

- incomplete UTF-8: with byte-level BPE a token may end in the middle of a
  character, and decoding it alone gives U+FFFD. The prefix/read offset
  technique (HF TGI, vLLM) decodes a short window of recent tokens twice,
  with and without the new ones, and releases only the difference, never
  the trailing U+FFFD of a character still incomplete.
- text that may be the start of a stop string: released only once it can no
  longer become one. On a match the text is cut before the stop string.

`finish()` releases whatever is still held (incomplete bytes come out as
U+FFFD, as the tokenizer decodes them).
"""

from __future__ import annotations

from typing import Protocol, Sequence

REPLACEMENT = "\ufffd"
# Prompt tokens used as left context for the first decode: some decoders
# (sentencepiece's leading-space handling) need it to decode the first output right.
PROMPT_CONTEXT = 5


class Decoder(Protocol):
    def decode(self, ids: Sequence[int]) -> str: ...


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Decoder, prompt_ids: Sequence[int], stop: Sequence[str] = ()) -> None:
        self._tok = tokenizer
        context = list(prompt_ids[-PROMPT_CONTEXT:])
        # A prompt that ends inside a character would make the context's own
        # decode end in U+FFFD and shift every delta: start without context then.
        if context and tokenizer.decode(context).endswith(REPLACEMENT):
            context = []
        # Only the window [prefix_offset:] is ever decoded; older ids are dropped.
        self._ids: list[int] = context
        self._prefix_offset = 0
        self._read_offset = len(context)
        self._window_emitted = 0  # chars of the current window already returned
        self._stop = tuple(stop)
        self._max_stop = max((len(s) for s in stop), default=0)
        self._pending = ""  # decoded but not yet released
        self.finished = False
        self.stopped_on: str | None = None  # the stop string that matched

    def add(self, token_id: int) -> str:
        """Feed one output token; returns the text now safe to release.

        After a stop string matched, `finished` is True and further tokens
        are ignored.
        """
        if self.finished:
            return ""
        self._ids.append(token_id)
        return self._release(self._decode_new())

    def finish(self) -> str:
        """The request ended (not on a stop string): release everything held."""
        if self.finished:
            return ""
        self.finished = True
        tail = self._tok.decode(self._ids[self._prefix_offset :])
        head = self._tok.decode(self._ids[self._prefix_offset : self._read_offset])
        out = self._pending + tail[len(head) + self._window_emitted :]
        self._pending = ""
        return out

    def _decode_new(self) -> str:
        window = self._ids[self._prefix_offset :]
        read = self._read_offset - self._prefix_offset
        prefix_text = self._tok.decode(window[:read])
        new_text = self._tok.decode(window)
        # Text before trailing U+FFFD is final (only the incomplete character
        # at the end can still change), so it goes out now: a stop string in
        # it is seen one token sooner.
        end = len(new_text)
        while end > len(prefix_text) and new_text[end - 1] == REPLACEMENT:
            end -= 1
        start = len(prefix_text) + self._window_emitted
        delta = new_text[start:end] if end > start else ""
        if len(new_text) > len(prefix_text) and end == len(new_text):
            # A clean boundary: the next window starts at what is now read.
            del self._ids[: self._read_offset]
            self._prefix_offset = 0
            self._read_offset = len(self._ids)
            self._window_emitted = 0
        else:
            self._window_emitted += len(delta)
        return delta

    def _release(self, delta: str) -> str:
        if not delta and not self._pending:
            return ""
        text = self._pending + delta
        if not self._stop:
            self._pending = ""
            return text
        # A new match must end inside the new text.
        search_from = max(0, len(self._pending) - self._max_stop + 1)
        hit = self._first_stop(text, search_from)
        if hit is not None:
            pos, s = hit
            self.finished = True
            self.stopped_on = s
            self._pending = ""
            return text[:pos]
        keep = self._partial_stop_suffix(text)
        self._pending = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep]

    def _first_stop(self, text: str, start: int) -> tuple[int, str] | None:
        best: tuple[int, str] | None = None
        for s in self._stop:
            pos = text.find(s, start)
            if pos >= 0 and (best is None or pos < best[0]):
                best = (pos, s)
        return best

    def _partial_stop_suffix(self, text: str) -> int:
        """Length of the longest suffix of `text` that a stop string starts with."""
        longest = 0
        for s in self._stop:
            for n in range(min(len(s) - 1, len(text)), longest, -1):
                if s.startswith(text[len(text) - n :]):
                    longest = n
                    break
        return longest
