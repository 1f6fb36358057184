"""The unix-socket wire protocol of SPEC.md section 2: frames, framing, decoding.

A frame is a u32 big-endian body length followed by a MessagePack map whose
`type` field names the frame. Client -> daemon: generate, abort, health, stats.
Daemon -> client: accepted, tokens, done, error, health, stats.

The daemon-side decoder never raises: whatever bytes arrive become either a
validated frame or an `ErrorFrame` (invalid_request, or too_large, after which
the connection must be closed). Validation rules live in `validate.py`.
"""

from __future__ import annotations

from typing import Any, Final, Union

import msgspec

from .explain import TYPE_WORDS, explain_validation_error
from .validate import MAX_ID_CHARS, validate_generate

DEFAULT_MAX_FRAME_BYTES: Final = 1 << 20
HEADER_BYTES: Final = 4

ERROR_CODES: Final = frozenset({"invalid_request", "too_large", "overloaded", "shutting_down", "internal"})
FINISH_REASONS: Final = frozenset({"eos", "stop", "length", "aborted", "error"})
CLIENT_FRAME_TYPES: Final = ("generate", "abort", "health", "stats")


# --------------------------------------------------------------------------
# client -> daemon


class GenerateFields(msgspec.Struct, kw_only=True):
    """A generate request's fields with SPEC 2.2's defaults, written once: the
    wire frame adds the connection-local `id`, the engine's GenerateParams nothing."""

    prompt: str | None = None
    prompt_ids: list[int] | None = None
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = msgspec.field(default_factory=list)
    stop_token_ids: list[int] = msgspec.field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int = 0
    # SPEC 2.2: false asks for plain decoding when the daemon speculates
    # (`--speculative`; see stages/spec/).
    speculative: bool = True


class GenerateFrame(GenerateFields, tag_field="type", tag="generate", kw_only=True):
    id: str


class AbortFrame(msgspec.Struct, tag_field="type", tag="abort"):
    id: str


class HealthQuery(msgspec.Struct, tag_field="type", tag="health"):
    pass


class StatsQuery(msgspec.Struct, tag_field="type", tag="stats"):
    pass


ClientFrame = Union[GenerateFrame, AbortFrame, HealthQuery, StatsQuery]


# --------------------------------------------------------------------------
# daemon -> client


class TokenLogprob(msgspec.Struct):
    """One emitted token's logprob entry; `top` holds [token_id, logprob] pairs."""

    token_id: int
    logprob: float
    rank: int
    top: list[tuple[int, float]]


class Usage(msgspec.Struct):
    prompt_tokens: int
    completion_tokens: int


class AcceptedFrame(msgspec.Struct, tag_field="type", tag="accepted"):
    id: str
    request_id: int


# omit_defaults: SPEC sends `logprobs` only when the request asked for them.
class TokensFrame(msgspec.Struct, tag_field="type", tag="tokens", omit_defaults=True):
    id: str
    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprob] | None = None


class DoneFrame(msgspec.Struct, tag_field="type", tag="done"):
    id: str
    finish_reason: str
    usage: Usage


# omit_defaults: `id` is present only when the error belongs to a request.
class ErrorFrame(msgspec.Struct, tag_field="type", tag="error", kw_only=True, omit_defaults=True):
    id: str | None = None
    code: str
    message: str


class HealthFrame(msgspec.Struct, tag_field="type", tag="health"):
    status: str
    model: str
    uptime_s: float


class StatsFrame(msgspec.Struct, tag_field="type", tag="stats"):
    """The counters travel flat in the frame's map next to `type` (SPEC 2.3
    lists them as the frame's fields); `counters` is only the Python view."""

    counters: dict[str, int | float]


DaemonFrame = Union[AcceptedFrame, TokensFrame, DoneFrame, ErrorFrame, HealthFrame, StatsFrame]
_TypedDaemonFrame = Union[AcceptedFrame, TokensFrame, DoneFrame, ErrorFrame, HealthFrame]


# --------------------------------------------------------------------------
# framing


class FrameTooLarge(Exception):
    """A header announced a body larger than the limit; the stream is unusable."""

    def __init__(self, length: int, limit: int) -> None:
        super().__init__(
            f"The frame announces a {length}-byte body but this daemon accepts at most {limit} bytes; "
            "send a shorter prompt or raise [server] max_frame_bytes."
        )
        self.length = length
        self.limit = limit


class FrameDecoder:
    """Splits a byte stream into frame bodies.

    The length is checked as soon as the 4-byte header is complete, before any
    of the body is kept, so a hostile length costs nothing. What stays
    buffered is at most one partial frame: header + limit bytes.
    """

    def __init__(self, max_body_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> None:
        if not 0 < max_body_bytes < 1 << 32:
            raise ValueError("max_body_bytes must be in [1, 2**32)")
        self.max_body_bytes = max_body_bytes
        self._buf = bytearray()
        self.error: FrameTooLarge | None = None

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        """Add bytes; return the bodies completed by them.

        On a header announcing more than the limit, the bodies before it are
        still returned, `error` is set and every later feed raises it.
        """
        if self.error is not None:
            raise self.error
        buf = self._buf
        buf += data
        bodies: list[bytes] = []
        while len(buf) >= HEADER_BYTES:
            length = int.from_bytes(buf[:HEADER_BYTES], "big")
            if length > self.max_body_bytes:
                self.error = FrameTooLarge(length, self.max_body_bytes)
                buf.clear()
                break
            end = HEADER_BYTES + length
            if len(buf) < end:
                break
            bodies.append(bytes(buf[HEADER_BYTES:end]))
            del buf[:end]  # bytearray front deletion is amortized O(1)
        return bodies


_encoder = msgspec.msgpack.Encoder()


def encode_body(frame: msgspec.Struct) -> bytes:
    if isinstance(frame, StatsFrame):
        return _encoder.encode({"type": "stats", **frame.counters})
    return _encoder.encode(frame)


def encode_frame(frame: msgspec.Struct) -> bytes:
    """Header + body, ready for the socket."""
    body = encode_body(frame)
    return len(body).to_bytes(HEADER_BYTES, "big") + body


def encode_raw_frame(body: bytes) -> bytes:
    """Frame arbitrary bytes (tests and tools that speak the protocol by hand)."""
    return len(body).to_bytes(HEADER_BYTES, "big") + body


# --------------------------------------------------------------------------
# daemon side: bytes -> validated frames or error frames, never an exception

_client_decoder = msgspec.msgpack.Decoder(ClientFrame)


class _Peek(msgspec.Struct):
    # Only to recover `type` and `id` from a frame that failed typed decoding,
    # so the error can name the request it belongs to.
    type: Any = None
    id: Any = None


def _peek(body: bytes) -> _Peek:
    try:
        return msgspec.msgpack.decode(body, type=_Peek)
    except Exception:  # noqa: BLE001 - a peek at a malformed body may fail any way
        return _Peek()


def _usable_id(value: object) -> str | None:
    if isinstance(value, str) and 0 < len(value) <= MAX_ID_CHARS:
        return value
    return None


def invalid(message: str, id: str | None = None) -> ErrorFrame:
    return ErrorFrame(id=id, code="invalid_request", message=message)


def _explain_decode_failure(exc: Exception, peek: _Peek) -> str:
    kinds = ", ".join(CLIENT_FRAME_TYPES)
    if isinstance(exc, msgspec.ValidationError):
        text = str(exc)
        if text.startswith("Object missing required field `type`"):
            return f"Every frame needs a `type` field: one of {kinds}."
        if text.startswith("Invalid value") and text.endswith("`$.type`"):
            return f"Unknown frame type {peek.type!r}; `type` must be one of {kinds}."
        subject = f"the {peek.type} frame" if peek.type in CLIENT_FRAME_TYPES else "a frame body"
        if text.startswith("Expected `object`, got `"):
            got = text.split("`")[3]
            return f"A frame body must be a MessagePack map with a `type` field, not {TYPE_WORDS.get(got, got)}."
        return explain_validation_error(exc, subject=subject)[1]
    if isinstance(exc, UnicodeDecodeError):
        return "A string in the frame is not valid UTF-8; send strings as UTF-8 text."
    if isinstance(exc, RecursionError):
        return "The frame is nested too deeply; frames are flat maps of scalars and lists."
    if isinstance(exc, msgspec.DecodeError):
        return f"The frame body is not valid MessagePack ({exc}); check the client's encoder."
    return f"The frame could not be decoded ({type(exc).__name__}); send a MessagePack map as SPEC section 2 describes."


def decode_client_frame(body: bytes) -> ClientFrame | ErrorFrame:
    """Decode and validate one body. Never raises."""
    try:
        frame = _client_decoder.decode(body)
    except Exception as exc:  # noqa: BLE001 - every malformed body becomes an error frame
        peek = _peek(body)
        # Only a generate frame's id is echoed: an error for someone else's
        # frame type must not look like the end of a live request.
        rid = _usable_id(peek.id) if peek.type == "generate" else None
        return invalid(_explain_decode_failure(exc, peek), rid)
    if isinstance(frame, GenerateFrame):
        problem = validate_generate(frame)
        if problem is not None:
            return invalid(problem, _usable_id(frame.id))
    elif isinstance(frame, AbortFrame):
        if _usable_id(frame.id) is None:
            return invalid(f"`id` must be a non-empty string of at most {MAX_ID_CHARS} characters.")
    return frame


class RequestDecoder:
    """Bytes from a client -> frames or error frames, never an exception.

    After a too_large error `closed` is set: the caller sends that error and
    closes the connection, since the stream can no longer be re-synchronized.
    """

    def __init__(self, max_body_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> None:
        self._frames = FrameDecoder(max_body_bytes)

    @property
    def closed(self) -> bool:
        return self._frames.error is not None

    @property
    def buffered(self) -> int:
        return self._frames.buffered

    def feed(self, data: bytes | bytearray | memoryview) -> list[ClientFrame | ErrorFrame]:
        if self.closed:
            return []
        out: list[ClientFrame | ErrorFrame] = [decode_client_frame(b) for b in self._frames.feed(data)]
        if self._frames.error is not None:
            out.append(ErrorFrame(code="too_large", message=str(self._frames.error)))
        return out


# --------------------------------------------------------------------------
# client side: bytes from the daemon -> frames


class ProtocolViolation(ValueError):
    """The daemon sent something that is not SPEC section 2."""


_daemon_decoder = msgspec.msgpack.Decoder(_TypedDaemonFrame)


def decode_daemon_frame(body: bytes) -> DaemonFrame:
    """Decode one body from the daemon; raises ProtocolViolation."""
    try:
        return _daemon_decoder.decode(body)  # the common case, one typed pass
    except msgspec.ValidationError as exc:
        first_error: Exception = exc  # may still be a (flat, untyped) stats frame
    except Exception as exc:  # noqa: BLE001
        raise ProtocolViolation(f"The daemon sent a body that is not MessagePack: {exc}") from exc
    try:
        obj = msgspec.msgpack.decode(body)
    except Exception as exc:  # noqa: BLE001
        raise ProtocolViolation(f"The daemon sent a body that is not MessagePack: {exc}") from exc
    if isinstance(obj, dict) and obj.get("type") == "stats":
        counters = {k: v for k, v in obj.items() if isinstance(k, str) and k != "type" and isinstance(v, (int, float))}
        return StatsFrame(counters=counters)
    raise ProtocolViolation(f"The daemon sent a frame this client does not understand: {first_error}")
