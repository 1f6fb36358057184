"""Hypothesis strategies for what a hostile or broken client sends (SPEC section 2).

Two shapes of input:

* `inband_bodies`: one complete frame body within the size limit. The daemon
  must answer it on the same connection (an error frame, or a normal answer
  when the body happens to be valid) and keep the connection usable.
* `stream_probes`: a byte stream for a fresh connection that breaks the
  framing itself (bad lengths, truncation, oversized headers, desynchronised
  bodies, odd split points). The daemon must answer with error frames only
  and close the connection.

Both the CI tests (echo engine and the real daemon) and bench/reliability.py
draw from here, so the full-count run fuzzes exactly what CI fuzzes. Bodies
are drawn in batches (`inband_batches`): hypothesis spends ~5 ms on each
example, ~1.5 ms a body when 25 come in one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import msgspec
from hypothesis import strategies as st
from overlapd.daemon.protocol import encode_raw_frame

TINY_VOCAB = 768  # the embedded model's vocabulary: ids around it are the interesting edges

# ---------------------------------------------------------------- any MessagePack value

scalars = (
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats()
    | st.text(max_size=12) | st.binary(max_size=12)
)
values = st.recursive(
    scalars, lambda v: st.lists(v, max_size=4) | st.dictionaries(st.text(max_size=8), v, max_size=4), max_leaves=12
)
FIELDS = ("id", "prompt", "prompt_ids", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop",
          "stop_token_ids", "ignore_eos", "logprobs")
TYPES = ["generate", "abort", "health", "stats", "", "generat", "GENERATE", "x" * 40, "accepted", "done"]
# A small pool, so duplicates of a live id come up often.
IDS = st.sampled_from(["a", "b", "c", "", "x" * 256, "x" * 257, "\u0000", "\U0001f600"])

hostile_maps = st.fixed_dictionaries(
    {"type": st.sampled_from(TYPES) | values},
    optional={**{k: values for k in FIELDS}, "id": IDS | values},
)

# ---------------------------------------------------------------- well-typed generate frames, hostile values

_edge_ints = st.sampled_from([0, 1, 2, TINY_VOCAB - 1, TINY_VOCAB, 2**31 - 1, 2**31, -1, 2**63 - 1, 2**64 - 1])
_token_ids = st.integers(0, TINY_VOCAB - 1) | _edge_ints
_floats = st.sampled_from(
    [0.0, -0.0, 1e-45, 1e-30, 1e-7, 0.5, 0.9999999, 1.0, 1.0000001, 2.0, 1e30, 3.4e38, 1e308, -1.0,
     math.inf, -math.inf, math.nan]
) | st.floats(0, 4)
_texts = st.text(
    alphabet=st.characters(codec="utf-8"), min_size=0, max_size=40
) | st.sampled_from(["\x00" * 8, "\u200b\u200d\ufeff", "\U0010ffff" * 4, "a" * 300, " " * 64, "\r\n" * 20])

hostile_generates = st.fixed_dictionaries(
    {"type": st.just("generate"), "id": IDS},
    optional={
        "prompt": _texts,
        "prompt_ids": st.lists(_token_ids, max_size=80),
        "max_tokens": st.integers(1, 40) | _edge_ints | st.sampled_from([-(2**63), 63, 64, 65]),
        "temperature": _floats,
        "top_p": _floats,
        "top_k": st.integers(0, 1000) | _edge_ints,
        "seed": st.none() | st.integers(0, 2**64 - 1) | _edge_ints,
        "stop": st.lists(_texts, max_size=17),
        "stop_token_ids": st.lists(_token_ids, max_size=40),
        "ignore_eos": st.booleans(),
        "logprobs": st.integers(0, 20) | st.sampled_from([-1, 21, 2**63 - 1]),
    },
)


@st.composite
def edgy_generates(draw: st.DrawFn, max_model_len: int = 64) -> dict[str, object]:
    """Generate frames that pass validation with extreme values, so they reach
    the scheduler, the sampler and the detokenizer (`max_model_len`: the fuzzed
    daemon's context, so most of them fit)."""
    frame: dict[str, object] = {"type": "generate", "id": draw(IDS)}
    if draw(st.booleans()):
        n = draw(st.integers(1, max_model_len // 2))
        frame["prompt_ids"] = draw(st.lists(st.integers(0, TINY_VOCAB - 1) | st.sampled_from([0, 1, TINY_VOCAB - 1]),
                                            min_size=n, max_size=n))
    else:
        n = 2 * 16  # a text prompt of <= 16 characters is at most ~2 tokens a character here
        frame["prompt"] = draw(st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=16))
    frame["max_tokens"] = draw(st.integers(1, max(1, max_model_len - n - 1)))
    frame["temperature"] = draw(st.sampled_from([0.0, 1e-45, 1e-30, 1e-7, 0.5, 1.0, 2.0, 1e30, 3.4e38, 1e308]))
    frame["top_p"] = draw(st.sampled_from([1e-45, 1e-7, 0.3, 0.9999999, 1.0]))
    frame["top_k"] = draw(st.sampled_from([0, 1, 2, TINY_VOCAB - 1, TINY_VOCAB, 2**31, 2**63 - 1]))
    frame["seed"] = draw(st.none() | st.sampled_from([0, 1, 2**63, 2**64 - 1]) | st.integers(0, 2**64 - 1))
    frame["stop"] = draw(st.lists(st.text(min_size=1, max_size=256), max_size=16))
    frame["stop_token_ids"] = draw(st.lists(st.integers(0, TINY_VOCAB - 1), max_size=8))
    frame["ignore_eos"] = draw(st.booleans())
    frame["logprobs"] = draw(st.integers(0, 20))
    return frame


hostile_aborts = st.fixed_dictionaries({"type": st.just("abort")}, optional={"id": IDS | values})


def _encode(obj: object) -> bytes:
    return msgspec.msgpack.encode(obj)


def _invalid_utf8(key: bytes, junk: bytes) -> bytes:
    # fixmap(2) {"type": "generate", <key>: <str8 holding `junk`>}: msgspec's
    # encoder would never produce invalid UTF-8, so these are built by hand.
    return b"\x82\xa4type\xa8generate" + bytes([0xA0 | len(key)]) + key + b"\xd9" + bytes([len(junk)]) + junk


invalid_utf8 = st.builds(
    _invalid_utf8,
    st.sampled_from([b"id", b"prompt", b"zz"]),
    st.sampled_from([b"\xff\xfe", b"\xc3\x28", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"ok\x80"]),
)
deep_nesting = st.sampled_from([
    b"\x91" * 3000,  # a list in a list in a list...
    b"\x81\xa1k" * 2000 + b"\xc0",  # maps in maps
    b"\x82\xa4type\xa8generate\xa6prompt" + b"\x91" * 5000 + b"\xc0",
])
duplicate_keys = st.sampled_from([
    b"\x82\xa4type\xa8generate\xa4type\xa6health",
    b"\x83\xa4type\xa8generate\xa2id\xa1a\xa2id\xa1b",
    b"\x82\xa4type\xa6health\xa4type\xa6health",
])
odd_msgpack = st.sampled_from([
    b"", b"\xc1", b"\xd4\x01\x00", b"\xd6\xff\x00\x00\x00\x00",  # reserved byte, ext types, a timestamp
    b"\xdf\xff\xff\xff\xff",  # map32 announcing 4 billion pairs
    b"\xdd\x7f\xff\xff\xff",  # array32 announcing 2 billion items
    b"\xcf\xff\xff\xff\xff\xff\xff\xff\xff",  # u64 max, not a map
    b"\x81\xa4type\xcf\xff\xff\xff\xff\xff\xff\xff\xff",
])

inband_bodies = st.one_of(
    st.binary(max_size=200),
    hostile_maps.map(_encode),
    hostile_generates.map(_encode),
    edgy_generates().map(_encode),  # valid but extreme: they reach the engine itself
    edgy_generates().map(_encode),
    hostile_aborts.map(_encode),
    invalid_utf8,
    deep_nesting,
    duplicate_keys,
    odd_msgpack,
)

BATCH = 25
inband_batches = st.lists(inband_bodies, min_size=BATCH, max_size=BATCH)

# ---------------------------------------------------------------- framing-level damage, on fresh connections


@dataclass(frozen=True)
class StreamProbe:
    """Bytes for one fresh connection, sent in `chunks`; `oversized`: a header
    above the limit is in it, so a `too_large` error must come before the close."""

    kind: str
    chunks: tuple[bytes, ...]
    oversized: bool = False


def stream_probes(max_frame: int) -> st.SearchStrategy[StreamProbe]:
    whole = inband_bodies.map(encode_raw_frame)

    def oversized(length: int, tail: bytes, before: list[bytes]) -> StreamProbe:
        return StreamProbe("oversized", (*before, length.to_bytes(4, "big") + tail), oversized=True)

    def truncated(body: bytes, keep: int) -> StreamProbe:
        frame = encode_raw_frame(body)
        return StreamProbe("truncated", (frame[: min(keep, len(frame) - 1)],))

    def bad_length(body: bytes, delta: int) -> StreamProbe:
        # The header lies by `delta`: the daemon reads into the next frame, or waits for bytes never sent.
        length = max(0, len(body) + delta)
        return StreamProbe("bad_length", (length.to_bytes(4, "big") + body,))

    def split(frames: list[bytes], cuts: list[int]) -> StreamProbe:
        data = b"".join(frames)
        points = sorted({c % (len(data) + 1) for c in cuts})
        pieces = [data[a:b] for a, b in zip([0, *points], [*points, len(data)]) if b > a]
        return StreamProbe("split", tuple(pieces))

    return st.one_of(
        st.builds(oversized, st.integers(max_frame + 1, 2**32 - 1), st.binary(max_size=64), st.lists(whole, max_size=2)),
        st.builds(truncated, inband_bodies, st.integers(0, 300)),
        st.builds(bad_length, inband_bodies, st.integers(-40, 40).filter(bool)),
        st.builds(split, st.lists(whole, min_size=1, max_size=4), st.lists(st.integers(0, 10**6), max_size=6)),
        st.builds(lambda n: StreamProbe("headers_only", (b"\x00" * n,)), st.integers(1, 64)),  # zero-length bodies
    )
