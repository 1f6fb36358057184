"""A small byte-level BPE trained in-process, for tests that need a real tokenizer."""

from __future__ import annotations

import functools

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

CORPUS = [
    "héllo wörld 日本語 🎉",
    "hello world, hello there",
    "the quick brown fox jumps over the lazy dog",
    "naïve café déjà vu — über straße",
    "日本語のテキストと絵文字 🎉🎊 ok",
    "stop here. STOP there. end of text",
]
EOS_TOKEN = "<eos>"


@functools.cache
def tiny_bpe(vocab_size: int = 300) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[EOS_TOKEN]
    )
    tok.train_from_iterator(CORPUS * 3, trainer)
    return tok
