"""A text prompt that cannot fit the context is refused before it is tokenized.

Found while testing the security limits (issue 6, item 8): encoding ran on
the daemon's event loop, so a 1 MiB prompt (within the frame limit) froze
every client's stream for ~0.8 s before being refused as too long, and a
client sending such frames back to back froze the daemon for everyone.
"""

from __future__ import annotations

import threading
import time

from daemon_harness import serve_real
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as HFTokenizer

from overlapd.daemon.protocol import ErrorFrame, TokensFrame
from overlapd.stages.model.tiny import tiny_checkpoint
from overlapd.stages.model.tokenizer import ByteTokenizer, Tokenizer

_, _, TOKENIZER_JSON = tiny_checkpoint()
TINY = Tokenizer(HFTokenizer.from_str(TOKENIZER_JSON), 0, (1,))


@given(st.text(max_size=300) | st.text(alphabet="ab <|>_oftexbgin", max_size=300))
@settings(max_examples=300, deadline=None, database=None, suppress_health_check=list(HealthCheck))
def test_no_token_stands_for_more_than_max_chars_per_token(text):
    # The bound the daemon's shortcut relies on: n tokens never cover more than n * max_chars_per_token characters.
    for tok in (TINY, ByteTokenizer(768, 0, (1,))):
        assert len(tok.encode(text, add_special_tokens=False)) * tok.max_chars_per_token >= len(text)


def test_a_huge_text_prompt_is_refused_at_once_and_other_streams_go_on(tmp_path):
    d = serve_real(tmp_path)
    try:
        gaps: list[float] = []

        def stream() -> None:
            with d.client() as c:
                last = None
                for frame in c.generate("steady", max_tokens=300, ignore_eos=True, temperature=0.0):
                    if isinstance(frame, TokensFrame):
                        now = time.monotonic()
                        if last is not None:
                            gaps.append(now - last)
                        last = now

        streamer = threading.Thread(target=stream)
        streamer.start()
        answers = []
        with d.raw() as raw:
            for i in range(4):  # ~1 MiB each, just under the default frame limit
                t0 = time.monotonic()
                raw.send({"type": "generate", "id": f"big{i}", "prompt": "ab cd " * 170_000})
                err = raw.recv()
                answers.append(time.monotonic() - t0)
                assert isinstance(err, ErrorFrame) and err.code == "invalid_request" and "prompt" in err.message
        streamer.join(60)
        # Decoding a 1 MiB frame takes milliseconds; encoding it took ~0.8 s. The
        # fastest of four answers is robust to a busy CI machine.
        assert min(answers) < 0.2, answers
        assert sorted(gaps)[-2] < 0.4, f"other streams stalled: {sorted(gaps)[-3:]}"
    finally:
        d.kill()
