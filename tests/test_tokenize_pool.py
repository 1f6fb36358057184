"""Prompts are tokenized off the event loop (issue 15, item 4).

A 1 MiB text takes about a second to encode. The daemon here serves a
checkpoint whose tokenizer has one 600-character token, so such a text is
not refused by length up front (2,048 positions x 600 characters) and is
really encoded, on the tokenize pool, while another client's stream runs;
that stream's inter-token gap must stay small. Before this, encoding ran on
the loop and the stream stopped for as long as each text took.
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from daemon_harness import serve_real
from tokenizers import AddedToken
from tokenizers import Tokenizer as HFTokenizer

from overlapd.daemon.protocol import AcceptedFrame, ErrorFrame, TokensFrame
from overlapd.stages.model.tiny import tiny_checkpoint, tiny_config, tiny_weights, train_tiny_tokenizer, write_hf_checkpoint
from overlapd.stages.model.tokenizer import Tokenizer
from overlapd.stages.tokenization.pool import TokenizePool, encode_releasing_gil

HUGE = "ab cd " * 170_000  # 1,020,000 characters: just under the default 1 MiB frame limit
LONG_TOKEN = "q" * 600


def tiny_tokenizer() -> Tokenizer:
    _, _, text = tiny_checkpoint()
    return Tokenizer(HFTokenizer.from_str(text), 0, (1,))


def test_pool_encodes_like_the_tokenizer() -> None:
    tok = tiny_tokenizer()
    texts = ["", "hello", "héllo wörld 日本語 🎉", "ab cd " * 1000]

    async def main() -> list[list[int]]:
        pool = TokenizePool(tok, workers=2, max_pending=8)
        try:
            return list(await asyncio.gather(*(pool.encode(t) for t in texts)))
        finally:
            pool.shutdown()

    assert asyncio.run(main()) == [tok.encode(t) for t in texts]
    assert [encode_releasing_gil(tok, t) for t in texts] == [tok.encode(t) for t in texts]


def test_the_pool_is_bounded_and_the_loop_runs_while_it_encodes() -> None:
    tok = tiny_tokenizer()

    async def main() -> tuple[float, bool]:
        pool = TokenizePool(tok, workers=1, max_pending=2)
        gaps: list[float] = []
        stop = asyncio.Event()

        async def ticker() -> None:
            last = time.perf_counter()
            while not stop.is_set():
                await asyncio.sleep(0.005)
                now = time.perf_counter()
                gaps.append(now - last)
                last = now

        tick = asyncio.create_task(ticker())
        await asyncio.sleep(0.02)
        jobs = [pool.encode(HUGE) for _ in range(2)]
        full = pool.full and pool.pending == 2
        with pytest.raises(RuntimeError, match="the bound"):
            pool.encode("one more")
        await asyncio.gather(*jobs)
        stop.set()
        await tick
        pool.shutdown()
        return max(gaps), full

    worst, full = asyncio.run(main())
    assert full
    # Two 1 MiB texts took ~2 s of encoding; the loop never stopped for more
    # than a fraction of that (generous for a loaded 2-core machine).
    assert worst < 0.3, f"the loop stalled {worst:.3f} s"


@pytest.fixture(scope="module")
def long_token_model(tmp_path_factory):
    """The tiny model with one extra 600-character token (so huge texts pass the length shortcut)."""
    tok = train_tiny_tokenizer()
    tok.add_tokens([AddedToken(LONG_TOKEN, normalized=False)])
    config = tiny_config(tok)
    path = tmp_path_factory.mktemp("long-token") / "ckpt"
    write_hf_checkpoint(path, config, tiny_weights(config, tok), tok.to_str())
    return path


def test_a_huge_prompt_is_tokenized_while_other_streams_go_on(tmp_path, long_token_model):
    d = serve_real(tmp_path, "--model", str(long_token_model))
    try:
        stamps: list[float] = []
        started, finished = threading.Event(), threading.Event()

        def stream() -> None:
            with d.client(timeout=60) as c:
                for frame in c.generate("steady", max_tokens=2000, ignore_eos=True, temperature=0.0):
                    if isinstance(frame, TokensFrame):
                        stamps.append(time.monotonic())
                        started.set()
                    if finished.is_set():
                        break  # leaving aborts it

        streamer = threading.Thread(target=stream)
        streamer.start()
        assert started.wait(60)
        window = [time.monotonic()]
        answers = []
        with d.raw() as raw:
            for i in range(3):
                t0 = time.monotonic()
                raw.send({"type": "generate", "id": f"big{i}", "prompt": HUGE})
                accepted = raw.recv()
                assert isinstance(accepted, AcceptedFrame), accepted  # accepted before it is encoded
                err = raw.recv()
                answers.append(time.monotonic() - t0)
                # encoded, then refused on its token count: far more than the context
                assert isinstance(err, ErrorFrame) and err.code == "invalid_request" and "tokens" in err.message, err
                assert err.id == f"big{i}"
        window.append(time.monotonic())
        finished.set()
        streamer.join(60)
        stats = d.stats()
        assert stats["queue_tokenize"] == 0
        gaps = [b - a for a, b in zip(stamps, stamps[1:]) if window[0] <= a and b <= window[1]]
        assert sum(answers) > 1.0, f"the texts were not really encoded: {answers}"
        assert len(gaps) > 20, f"the stream hardly ran meanwhile: {len(gaps)} tokens in {sum(answers):.1f} s"
        # Encoding on the loop, every text stopped the stream for ~1 s.
        assert sorted(gaps)[-2] < 0.4, f"other streams stalled: {sorted(gaps)[-3:]} while encoding took {answers}"
    finally:
        d.kill()
