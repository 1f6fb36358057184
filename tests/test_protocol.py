"""SPEC section 2 framing and validation: round trips, field-naming errors,
and a decoder that never raises whatever bytes arrive."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from overlapd.daemon.protocol import (
    AbortFrame,
    AcceptedFrame,
    DoneFrame,
    ErrorFrame,
    FrameDecoder,
    GenerateFrame,
    HealthFrame,
    HealthQuery,
    RequestDecoder,
    StatsFrame,
    StatsQuery,
    TokenLogprob,
    TokensFrame,
    Usage,
    decode_client_frame,
    decode_daemon_frame,
    encode_body,
    encode_frame,
    encode_raw_frame,
)

pack = msgspec.msgpack.encode
FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def gen(**fields: object) -> bytes:
    return pack({"type": "generate", "id": "a", "prompt": "hi", **fields})


# ------------------------------------------------------------------ framing


DAEMON_FRAMES = [
    AcceptedFrame("a", 2**64 - 1),
    TokensFrame("a", [1, 2], "hé"),
    TokensFrame("a", [7], "x", [TokenLogprob(7, -0.25, 1, [(7, -0.25), (9, -3.5)])]),
    DoneFrame("a", "length", Usage(3, 16)),
    ErrorFrame(id="a", code="overloaded", message="Retry shortly."),
    ErrorFrame(code="too_large", message="Too big."),
    HealthFrame("ok", "tiny", 12.5),
    StatsFrame({"requests": 3, "kv_blocks_free": 10, "uptime_s": 1.5}),
]


@pytest.mark.parametrize("frame", DAEMON_FRAMES, ids=lambda f: type(f).__name__)
def test_daemon_frames_round_trip(frame):
    wire = encode_frame(frame)
    assert int.from_bytes(wire[:4], "big") == len(wire) - 4  # u32 big-endian length
    (body,) = FrameDecoder().feed(wire)
    assert decode_daemon_frame(body) == frame


CLIENT_FRAMES = [
    GenerateFrame(id="a", prompt="hello"),
    GenerateFrame(
        id="b", prompt_ids=[1, 2**31 - 1], max_tokens=3, temperature=0.0, top_p=0.5, top_k=40,
        seed=2**64 - 1, stop=["\n"], stop_token_ids=[2], ignore_eos=True, logprobs=20,
    ),
    AbortFrame("a"),
    HealthQuery(),
    StatsQuery(),
]


@pytest.mark.parametrize("frame", CLIENT_FRAMES, ids=lambda f: type(f).__name__)
def test_client_frames_round_trip(frame):
    assert RequestDecoder().feed(encode_frame(frame)) == [frame]


def test_wire_maps_match_spec():
    assert msgspec.msgpack.decode(encode_body(TokensFrame("a", [1], "x"))) == {
        "type": "tokens", "id": "a", "token_ids": [1], "text": "x"
    }  # no `logprobs` unless asked
    assert msgspec.msgpack.decode(encode_body(ErrorFrame(code="internal", message="m"))) == {
        "type": "error", "code": "internal", "message": "m"
    }  # no `id` for connection-level errors
    assert msgspec.msgpack.decode(encode_body(DoneFrame("a", "eos", Usage(1, 2)))) == {
        "type": "done", "id": "a", "finish_reason": "eos", "usage": {"prompt_tokens": 1, "completion_tokens": 2}
    }
    assert msgspec.msgpack.decode(encode_body(StatsFrame({"requests": 1}))) == {"type": "stats", "requests": 1}
    lp = msgspec.msgpack.decode(encode_body(TokensFrame("a", [1], "x", [TokenLogprob(1, -1.0, 2, [(1, -1.0)])])))
    assert lp["logprobs"] == [{"token_id": 1, "logprob": -1.0, "rank": 2, "top": [[1, -1.0]]}]


def test_generate_defaults_are_specs():
    (frame,) = RequestDecoder().feed(encode_raw_frame(pack({"type": "generate", "id": "a", "prompt": "x"})))
    assert frame == GenerateFrame(
        id="a", prompt="x", prompt_ids=None, max_tokens=16, temperature=1.0, top_p=1.0, top_k=0, seed=None,
        stop=[], stop_token_ids=[], ignore_eos=False, logprobs=0,
    )


@given(st.lists(st.integers(0, 40), min_size=1, max_size=30))
@FAST
def test_frames_split_anywhere_reassemble(cuts):
    frames = CLIENT_FRAMES * 2
    wire = b"".join(encode_frame(f) for f in frames)
    dec = RequestDecoder()
    out, pos = [], 0
    for c in cuts:
        out += dec.feed(wire[pos : pos + c])
        pos += c
    out += dec.feed(wire[pos:])
    assert out == frames


def test_too_large_is_refused_from_the_header_alone():
    dec = RequestDecoder(max_body_bytes=1000)
    ok = encode_frame(HealthQuery())
    out = dec.feed(ok + (1001).to_bytes(4, "big"))  # no body byte sent yet
    assert out[0] == HealthQuery()
    assert out[1].code == "too_large" and "1001" in out[1].message and "1000" in out[1].message
    assert dec.closed and dec.buffered == 0
    assert dec.feed(b"x" * 5000) == []  # nothing is buffered after the verdict


def test_frame_of_exactly_the_limit_is_accepted():
    body = gen(prompt="x" * 200)
    dec = RequestDecoder(max_body_bytes=len(body))
    assert isinstance(dec.feed(encode_raw_frame(body))[0], GenerateFrame)


def test_decoder_buffers_at_most_one_partial_frame():
    dec = FrameDecoder(max_body_bytes=100)
    dec.feed((100).to_bytes(4, "big") + b"x" * 60)
    assert dec.buffered == 64
    assert dec.feed(b"x" * 40 + (3).to_bytes(4, "big")) == [b"x" * 100]
    assert dec.buffered == 4


# ------------------------------------------------------------------ validation


RANGE_CASES = [
    ("id", {"id": ""}),
    ("id", {"id": "x" * 257}),
    ("prompt", {"prompt": ""}),
    ("prompt_ids", {"prompt": None, "prompt_ids": []}),
    ("prompt_ids[1]", {"prompt": None, "prompt_ids": [1, -1]}),
    ("prompt_ids[0]", {"prompt": None, "prompt_ids": [2**31]}),
    ("max_tokens", {"max_tokens": 0}),
    ("temperature", {"temperature": -0.1}),
    ("temperature", {"temperature": float("nan")}),
    ("temperature", {"temperature": float("inf")}),
    ("top_p", {"top_p": 0.0}),
    ("top_p", {"top_p": 1.5}),
    ("top_p", {"top_p": float("nan")}),
    ("top_k", {"top_k": -1}),
    ("seed", {"seed": -1}),
    ("stop", {"stop": ["x"] * 17}),
    ("stop[0]", {"stop": [""]}),
    ("stop[1]", {"stop": ["a", "y" * 257]}),
    ("stop_token_ids[0]", {"stop_token_ids": [-5]}),
    ("logprobs", {"logprobs": 21}),
    ("logprobs", {"logprobs": -1}),
]


@pytest.mark.parametrize("field,fields", RANGE_CASES, ids=[f"{c[0]}={list(c[1].values())[-1]!r}"[:40] for c in RANGE_CASES])
def test_each_range_rule_names_its_field(field, fields):
    err = decode_client_frame(gen(**fields))
    assert isinstance(err, ErrorFrame) and err.code == "invalid_request"
    assert f"`{field}`" in err.message
    assert err.message.endswith(".")
    # The error belongs to the request when its id is usable.
    assert err.id == (fields.get("id", "a") if field != "id" else None)


def test_exactly_one_of_prompt_and_prompt_ids():
    both = decode_client_frame(gen(prompt_ids=[1]))
    neither = decode_client_frame(pack({"type": "generate", "id": "a"}))
    for err in (both, neither):
        assert isinstance(err, ErrorFrame) and "`prompt`" in err.message and "`prompt_ids`" in err.message


TYPE_CASES = [
    ("id", {"id": 5}),
    ("prompt", {"prompt": 5}),
    ("prompt_ids", {"prompt": None, "prompt_ids": "abc"}),
    ("prompt_ids[0]", {"prompt": None, "prompt_ids": ["a"]}),
    ("max_tokens", {"max_tokens": "16"}),
    ("max_tokens", {"max_tokens": 1.5}),
    ("temperature", {"temperature": "hot"}),
    ("top_p", {"top_p": None}),
    ("top_k", {"top_k": True}),
    ("seed", {"seed": "x"}),
    ("stop", {"stop": "\n"}),
    ("stop[0]", {"stop": [1]}),
    ("stop_token_ids[0]", {"stop_token_ids": [1.5]}),
    ("ignore_eos", {"ignore_eos": 1}),
    ("logprobs", {"logprobs": [1]}),
]


@pytest.mark.parametrize("field,fields", TYPE_CASES, ids=[c[0] + "-" + type(list(c[1].values())[-1]).__name__ for c in TYPE_CASES])
def test_wrong_types_name_the_field(field, fields):
    err = decode_client_frame(gen(**fields))
    assert isinstance(err, ErrorFrame) and err.code == "invalid_request"
    assert f"`{field}`" in err.message, err.message


def test_unknown_fields_are_ignored():
    frame = decode_client_frame(gen(future_option={"nested": [1, 2]}, another=3))
    assert isinstance(frame, GenerateFrame) and frame.prompt == "hi"


def test_abort_needs_a_usable_id():
    assert decode_client_frame(pack({"type": "abort", "id": "a"})) == AbortFrame("a")
    for bad in ({"type": "abort"}, {"type": "abort", "id": ""}, {"type": "abort", "id": 3}):
        err = decode_client_frame(pack(bad))
        assert isinstance(err, ErrorFrame) and "`id`" in err.message and err.id is None


MALFORMED = {
    "garbage": b"\xc1\xff\x00garbage",
    "empty": b"",
    "truncated": pack({"type": "generate", "id": "a", "prompt": "hello"})[:-2],
    "non-map": pack([1, 2, 3]),
    "scalar": pack(42),
    "unknown type": pack({"type": "launch", "id": "a"}),
    "missing type": pack({"id": "a", "prompt": "x"}),
    "non-str type": pack({"type": 7}),
    "invalid utf-8": b"\x82\xa4type\xa8generate\xa2id\xa2\xff\xfe",
    "deep nesting": b"\x82\xa4type\xa6health\xa1x" + b"\x91" * 100_000 + b"\x90",
    "huge ints": pack({"type": "generate", "id": "a", "prompt_ids": [2**64 - 1, -(2**63)]}),
    "huge array header": b"\x82\xa4type\xa8generate\xaaprompt_ids\xdd\xff\xff\xff\xff",
    "huge map header": b"\xdf\xff\xff\xff\xff",
    "ext value": b"\x83\xa4type\xa8generate\xa2id\xa1a\xa6prompt\xd4\x01\x00",
}


@pytest.mark.parametrize("body", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_bodies_become_invalid_request(body):
    err = decode_client_frame(body)
    assert isinstance(err, ErrorFrame) and err.code == "invalid_request"
    assert err.message[0].isupper() or err.message.startswith("`")
    assert err.message.endswith(".")


def test_messages_for_type_problems_say_what_to_send():
    assert "one of generate, abort, health, stats" in decode_client_frame(MALFORMED["unknown type"]).message
    assert "`type` field" in decode_client_frame(MALFORMED["missing type"]).message
    assert "map" in decode_client_frame(MALFORMED["non-map"]).message
    assert "UTF-8" in decode_client_frame(MALFORMED["invalid utf-8"]).message
    assert "nested too deeply" in decode_client_frame(MALFORMED["deep nesting"]).message


def test_only_generate_errors_carry_the_id():
    assert decode_client_frame(gen(max_tokens="x")).id == "a"
    assert decode_client_frame(MALFORMED["unknown type"]).id is None


# ------------------------------------------------------------------ hostile input never raises

msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=20) | st.binary(max_size=20),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=30,
)
generate_fields = st.fixed_dictionaries(
    {"type": st.sampled_from(["generate", "abort", "health", "stats", "nope"])},
    optional={
        k: msgpack_values
        for k in ("id", "prompt", "prompt_ids", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop",
                  "stop_token_ids", "ignore_eos", "logprobs")
    },
)


@given(st.binary(max_size=300))
@FAST
def test_random_bytes_never_raise(body):
    out = decode_client_frame(body)
    assert isinstance(out, (GenerateFrame, AbortFrame, HealthQuery, StatsQuery, ErrorFrame))


@given(generate_fields)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_random_frame_maps_never_raise(fields):
    out = decode_client_frame(pack(fields))
    if isinstance(out, ErrorFrame):
        assert out.code == "invalid_request" and out.message
    else:
        assert out.__struct_config__.tag == fields["type"]


@given(st.lists(st.binary(max_size=64), max_size=20), st.integers(8, 256))
@FAST
def test_random_streams_never_raise_and_stay_bounded(chunks, limit):
    dec = RequestDecoder(max_body_bytes=limit)
    for chunk in chunks:
        for item in dec.feed(chunk):
            assert isinstance(item, (GenerateFrame, AbortFrame, HealthQuery, StatsQuery, ErrorFrame))
        assert dec.buffered <= 4 + limit
