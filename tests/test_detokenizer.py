"""Incremental detokenization with a real byte-level BPE trained here."""

from __future__ import annotations

import random

import pytest
from overlapd.stages.output.detokenizer import REPLACEMENT, IncrementalDetokenizer
from tiny_bpe import CORPUS, tiny_bpe
from tokenizers import Tokenizer


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return tiny_bpe()


def ids_of(tok: Tokenizer, text: str) -> list[int]:
    return tok.encode(text).ids


def stream(det: IncrementalDetokenizer, ids: list[int]) -> list[str]:
    return [det.add(i) for i in ids]


TEXTS = CORPUS + ["🎉", "a🎉b", "日", "xyz 語語語 🎉🎉 é", "plain ascii only"]


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_rebuild_the_text_and_never_split_a_character(tok, text) -> None:
    ids = ids_of(tok, text)
    det = IncrementalDetokenizer(tok, ids_of(tok, "prompt: "))
    deltas = stream(det, ids)
    assert all(REPLACEMENT not in d for d in deltas)
    assert "".join(deltas) + det.finish() == text


def test_a_multibyte_character_over_several_tokens_is_held_until_complete(tok) -> None:
    ids = ids_of(tok, "a🎉")
    assert len(ids) >= 3, "the emoji should span byte tokens in this small vocabulary"
    det = IncrementalDetokenizer(tok, [])
    deltas = stream(det, ids)
    assert deltas[0] == "a"
    assert all(d == "" for d in deltas[1:-1])  # the emoji's first bytes: nothing yet
    assert deltas[-1] == "🎉"


def test_incomplete_bytes_at_the_end_come_out_at_finish(tok) -> None:
    ids = ids_of(tok, "ok🎉")
    det = IncrementalDetokenizer(tok, [])
    out = "".join(stream(det, ids[:-1]))
    assert out == "ok"
    tail = det.finish()
    assert tail and set(tail) == {REPLACEMENT}  # the bytes we have, as the tokenizer decodes them
    assert det.add(ids[-1]) == ""  # nothing after finish


def test_prompt_ending_inside_a_character(tok) -> None:
    ids = ids_of(tok, "x🎉 hello")
    cut = next(i for i in range(1, len(ids)) if tok.decode(ids[:i]).endswith(REPLACEMENT))
    det = IncrementalDetokenizer(tok, ids[:cut])
    text = "".join(stream(det, ids[cut:])) + det.finish()
    assert text.endswith(" hello")


@pytest.mark.parametrize("text", TEXTS)
def test_stop_strings_across_token_boundaries(tok, text) -> None:
    rng = random.Random(text)
    ids = ids_of(tok, text)
    for _ in range(20):
        a = rng.randrange(len(text))
        b = rng.randrange(a + 1, min(len(text), a + 6) + 1)
        stop = text[a:b]
        det = IncrementalDetokenizer(tok, [], stop=[stop, "never-in-text"])
        released = ""
        for n, i in enumerate(ids, 1):
            released += det.add(i)
            assert stop not in released
            if det.finished:
                break
        assert det.finished and det.stopped_on == stop
        assert released == text[: text.find(stop)]
        # It stopped on the first token whose text completes the stop string.
        assert stop in tok.decode(ids[:n]) and stop not in tok.decode(ids[: n - 1])


def test_text_that_may_start_a_stop_string_is_held_then_released(tok) -> None:
    det = IncrementalDetokenizer(tok, [], stop=["world!"])
    released = "".join(stream(det, ids_of(tok, "hello world")))
    assert released == "hello "  # "world" could still become "world!"
    assert not det.finished
    assert det.add(ids_of(tok, ".")[0]) == "world."  # it did not: released
    det2 = IncrementalDetokenizer(tok, [], stop=["world!"])
    stream(det2, ids_of(tok, "hello wor"))
    assert det2.finish() == "wor"  # hold-back released when the request ends


def test_earliest_stop_string_wins(tok) -> None:
    det = IncrementalDetokenizer(tok, [], stop=["there", "lo"])
    released = "".join(stream(det, ids_of(tok, "hello there")))
    assert det.stopped_on == "lo" and released == "hel"


def test_random_token_streams_rebuild_the_full_decode(tok) -> None:
    # Arbitrary ids, invalid UTF-8 included: the deltas plus the final flush
    # are exactly what decoding everything at once gives.
    rng = random.Random(3)
    vocab = tok.get_vocab_size()
    for _ in range(300):
        ids = [rng.randrange(1, vocab) for _ in range(rng.randrange(1, 12))]
        det = IncrementalDetokenizer(tok, [])
        assert "".join(stream(det, ids)) + det.finish() == tok.decode(ids)
