"""The boundary between the socket server and the pipeline.

The server turns a validated `generate` frame into `GenerateParams`, hands it
to `Engine.submit` together with a `RequestSink`, and the pipeline's emit
stage reports back through that sink. Nothing here knows about sockets; the
pipeline knows nothing about connections or client ids.

Contract (the server enforces its half, the engine must keep its own):

* `submit` runs on the event loop thread, returns the u64 `request_id` that
  the ring uses (SPEC 1.3), or raises `EngineError`. It must not call the sink
  before returning; the server nevertheless holds early calls until the
  `accepted` frame is out, so a slip cannot reorder frames.
* The sink is called on the event loop thread only (from the emit stage), never
  from the device thread: use `loop.call_soon_threadsafe` to cross over.
* Every submitted request ends with exactly one `on_done` or `on_error`. The
  server ignores every call after the first terminal one, so an engine that
  reports twice cannot put two ends on the wire, but one that never reports
  leaves a client waiting until the daemon closes.
* `abort` is idempotent and may name a request that already finished; the
  request then ends with `on_done("aborted", ...)`, during the call or later,
  unless it had already ended.
* `stats` returns flat counters (str -> int | float); they are merged into
  the `stats` frame. The names in `SERVER_COUNTER_NAMES` belong to the server
  (an engine value under one of them is replaced); `live_requests` and
  `uptime_s` are the engine's when it reports them.
* `render_chat` and `token_texts` serve the HTTP API (daemon/http/): a chat
  request becomes one prompt string, logprobs name their tokens as text.
  Both run on the event loop and must be quick.
"""

from __future__ import annotations

from typing import Final, Protocol, runtime_checkable

from .protocol import GenerateFields, GenerateFrame, TokenLogprob

__all__ = [
    "ENGINE_ERROR_CODES",
    "SERVER_COUNTER_NAMES",
    "Engine",
    "EngineError",
    "GenerateParams",
    "RequestSink",
    "TokenLogprob",
    "params_from_frame",
]

ENGINE_ERROR_CODES: Final = frozenset({"invalid_request", "overloaded", "shutting_down", "internal"})

SERVER_COUNTER_NAMES: Final = frozenset(
    {
        "connections",
        "connections_total",
        "connections_refused",
        "frames_in",
        "frames_out",
        "errors",
        "requests_accepted",
        "requests_rejected",
        "disconnect_aborts",
        "slow_client_disconnects",
        "server_live_requests",
    }
)


class GenerateParams(GenerateFields, kw_only=True):
    """A validated generate request (SPEC 2.2 without the connection-local `id`).

    Exactly one of `prompt` / `prompt_ids` is set; token ids are in [0, 2^31);
    `seed` is None or in [0, 2^64); ranges are as SPEC 2.2 and `validate.py`.
    """


def params_from_frame(frame: GenerateFrame) -> GenerateParams:
    return GenerateParams(**{name: getattr(frame, name) for name in GenerateFields.__struct_fields__})


@runtime_checkable
class RequestSink(Protocol):
    """One per accepted request; called on the event loop thread by the emit stage."""

    def on_tokens(self, token_ids: list[int], text: str, logprobs: list[TokenLogprob] | None) -> None:
        """New tokens and the text they completed (never half a UTF-8 character)."""
        ...

    def on_done(self, finish_reason: str, prompt_tokens: int, completion_tokens: int) -> None:
        """Terminal: finish_reason is one of eos, stop, length, aborted, error."""
        ...

    def on_error(self, code: str, message: str) -> None:
        """Terminal: code is one of ENGINE_ERROR_CODES; message is a sentence a person can act on."""
        ...


class EngineError(Exception):
    """Raised by `Engine.submit` to refuse a request; becomes one `error` frame.

    code: 'invalid_request' (name the field in the message, e.g. "`prompt_ids`
    holds 9000 tokens but the context is 4096"), 'overloaded' (bounded queues
    full), 'shutting_down' (draining) or 'internal'.
    """

    def __init__(self, code: str, message: str) -> None:
        if code not in ENGINE_ERROR_CODES:
            raise ValueError(f"EngineError code must be one of {sorted(ENGINE_ERROR_CODES)}, not {code!r}")
        super().__init__(message)
        self.code = code
        self.message = message


@runtime_checkable
class Engine(Protocol):
    model_name: str

    def submit(self, params: GenerateParams, sink: RequestSink) -> int:
        """Admit a request; return its u64 request_id or raise EngineError."""
        ...

    def abort(self, request_id: int) -> None:
        """Idempotent; the pipeline later calls sink.on_done('aborted', ...) once."""
        ...

    def stats(self) -> dict[str, int | float]:
        ...

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        """The prompt for chat `messages` ({"role", "content"} each), through the
        model's chat template; raises ValueError with a sentence a person can act on."""
        ...

    def token_texts(self, token_ids: list[int]) -> list[str]:
        """Each token's own text (special tokens included), for logprobs."""
        ...

    @property
    def draining(self) -> bool:
        """True once the engine admits nothing new (SIGTERM)."""
        ...
