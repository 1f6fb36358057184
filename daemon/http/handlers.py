"""The generation endpoints: request body -> engine -> JSON answer or server-sent events.

Every accepted request ends in the `finally` of `_generate`: if the engine has
not ended it (the client went away, the handler was cancelled, the client
read too slowly), it is aborted there, which frees its KV blocks at once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import msgspec
import structlog
from aiohttp import web

from ..engine_api import Engine, EngineError, GenerateParams
from ..explain import explain_validation_error
from .config import HttpConfig
from .errors import ApiError
from .formats import ChatFormat, CompletionFormat, ResponseFormat
from .metrics import HttpMetrics
from .params import chat_messages, chat_params, completion_params
from .schemas import ChatRequest, CompletionRequest
from .sink import Failed, Finished, HttpSink, Piece

T = TypeVar("T")
log = structlog.get_logger("overlapd.http")
_json = msgspec.json.Encoder()
SSE_DONE = b"data: [DONE]\n\n"


def sse(obj: msgspec.Struct) -> bytes:
    return b"data: " + _json.encode(obj) + b"\n\n"


async def read_body(request: web.Request, cls: type[T], limit: int) -> T:
    if request.content_length is not None and request.content_length > limit:
        raise ApiError(413, f"The body is {request.content_length} bytes; this server takes at most {limit}.",
                       code="request_too_large", param=None)
    try:
        raw = await request.read()  # aiohttp stops a chunked body at client_max_size (413)
    except web.HTTPRequestEntityTooLarge:
        raise ApiError(413, f"The body is over {limit} bytes, the most this server takes.",
                       code="request_too_large", param=None) from None
    try:
        return msgspec.json.decode(raw, type=cls)
    except msgspec.ValidationError as exc:
        path, sentence = explain_validation_error(exc, subject="the request body")
        raise ApiError(400, sentence, code="invalid_request", param=path.split(".")[0].split("[")[0] or None) from None
    except msgspec.DecodeError as exc:
        raise ApiError(400, f"The body is not valid JSON ({exc}); send a JSON object.", code="invalid_json",
                       param=None) from None


class GenerationApi:
    def __init__(
        self,
        engine: Engine,
        config: HttpConfig,
        metrics: HttpMetrics,
        refusal: Callable[[], ApiError | None],
    ) -> None:
        self.engine = engine
        self.config = config
        self.metrics = metrics
        self._refusal = refusal  # the server's admission check: draining, too many live
        self.live: dict[int, HttpSink] = {}

    def check_model(self, model: str | None) -> None:
        name = str(self.engine.model_name)
        if model is not None and model != name:
            raise ApiError(404, f"The model `{model}` does not exist here; this daemon serves `{name}` (GET /v1/models).",
                           code="model_not_found", param="model")

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._counted(request, "completions", self._completions)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._counted(request, "chat", self._chat)

    async def _counted(self, request: web.Request, endpoint: str, handler: Any) -> web.StreamResponse:
        try:
            return await handler(request, endpoint)
        except ApiError as exc:
            self.metrics.requests.labels(endpoint, str(exc.status)).inc()
            raise

    async def _completions(self, request: web.Request, endpoint: str) -> web.StreamResponse:
        req = await read_body(request, CompletionRequest, self.config.max_body_bytes)
        self.check_model(req.model)
        params = completion_params(req)
        fmt = CompletionFormat(str(self.engine.model_name), self.engine.token_texts, req.logprobs)
        include_usage = req.stream_options is not None and req.stream_options.include_usage
        return await self._generate(request, endpoint, params, fmt, req.stream, include_usage)

    async def _chat(self, request: web.Request, endpoint: str) -> web.StreamResponse:
        req = await read_body(request, ChatRequest, self.config.max_body_bytes)
        self.check_model(req.model)
        params = chat_params(req, self.config.default_chat_max_tokens)
        messages = chat_messages(req.messages)
        try:
            prompt = self.engine.render_chat(messages)
        except ValueError as exc:
            raise ApiError(400, str(exc), code="invalid_request", param="messages") from None
        if not prompt:
            raise ApiError(400, "The messages render to an empty prompt; send a message with some content.",
                           code="invalid_request", param="messages")
        params = msgspec.structs.replace(params, prompt=prompt)
        top = (req.top_logprobs or 0) if req.logprobs else None
        fmt = ChatFormat(str(self.engine.model_name), self.engine.token_texts, top)
        include_usage = req.stream_options is not None and req.stream_options.include_usage
        return await self._generate(request, endpoint, params, fmt, req.stream, include_usage)

    # ------------------------------------------------------------ the shared loop

    async def _generate(
        self,
        request: web.Request,
        endpoint: str,
        params: GenerateParams,
        fmt: ResponseFormat,
        stream: bool,
        include_usage: bool,
    ) -> web.StreamResponse:
        refusal = self._refusal()
        if refusal is not None:
            raise refusal
        sink = HttpSink(self.config.max_buffered_events, self.metrics)
        try:
            request_id = self.engine.submit(params, sink)
        except EngineError as exc:
            raise ApiError.from_engine(exc) from None
        except Exception:  # noqa: BLE001 - an engine bug costs one request, not the daemon
            log.exception("engine_submit_failed")
            raise ApiError(500, "The engine failed while admitting this request; the daemon log has the details.",
                           code="internal") from None
        self.live[request_id] = sink
        outcome: str | None = "disconnected"  # None: an ApiError, counted by _counted
        try:
            if stream:
                resp = await self._stream(request, sink, fmt, include_usage)
            else:
                resp = await self._whole(sink, fmt)
            end = sink.end
            outcome = end.reason if isinstance(end, Finished) else "error"
            return resp
        except ApiError:
            outcome = None
            raise
        finally:
            del self.live[request_id]
            if not sink.engine_ended:
                self.engine.abort(request_id)
            if outcome is not None:
                self.metrics.requests.labels(endpoint, outcome).inc()
            end = sink.end
            if isinstance(end, Finished):
                self.metrics.prompt_tokens.inc(end.prompt_tokens)
                self.metrics.completion_tokens.inc(end.completion_tokens)
                self.metrics.e2e.observe(sink.elapsed_s)

    async def _whole(self, sink: HttpSink, fmt: ResponseFormat) -> web.Response:
        pieces: list[Piece] = []
        while batch := await sink.next_pieces():
            pieces += batch
        end = sink.end
        if isinstance(end, Failed):
            raise ApiError.from_code(end.code, end.message)
        assert end is not None
        return web.Response(body=_json.encode(fmt.whole(pieces, end)), content_type="application/json")

    async def _stream(
        self, request: web.Request, sink: HttpSink, fmt: ResponseFormat, include_usage: bool
    ) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        for first in fmt.start():
            await resp.write(sse(first))
        # A slow reader gets what piled up as one chunk: fewer, larger writes.
        while batch := await sink.next_pieces():
            await resp.write(sse(fmt.chunk(batch)))
        end = sink.end
        if isinstance(end, Finished):
            await resp.write(sse(fmt.last(end)))
            if include_usage:
                await resp.write(sse(fmt.usage_chunk(end)))
        elif isinstance(end, Failed):
            # The status line is long gone: the error travels as an event, as vLLM's does.
            await resp.write(b"data: " + ApiError.from_code(end.code, end.message).body() + b"\n\n")
        await resp.write(SSE_DONE)
        await resp.write_eof()
        return resp

    def abort_all(self) -> int:
        for request_id in list(self.live):
            self.engine.abort(request_id)
        return len(self.live)
