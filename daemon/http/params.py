"""OpenAI request fields -> the engine's `GenerateParams`, checked by the socket protocol's rules.

The range rules are `validate.py`'s, the same sentences a socket client gets;
what only HTTP has (n, penalties, chat messages) is checked here.
"""

from __future__ import annotations

import math
from typing import Final

from ..engine_api import GenerateParams
from ..protocol import GenerateFrame
from ..validate import MAX_LOGPROBS, validate_generate
from .errors import ApiError
from .schemas import ChatMessage, ChatRequest, CompletionRequest, _SamplingFields

MAX_MESSAGES: Final = 1024
CHAT_ROLES: Final = frozenset({"system", "developer", "user", "assistant", "tool"})


def _bad(message: str, param: str) -> ApiError:
    return ApiError(400, message, code="invalid_request", param=param)


def _unsupported(req: _SamplingFields) -> None:
    if req.n != 1:
        raise _bad(f"`n` must be 1 (got {req.n}); send {req.n} requests instead.", "n")
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(req, name)
        if value not in (None, 0, 0.0):
            raise _bad(f"`{name}` is not supported; leave it out or send 0.", name)


def _stops(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else list(stop)


def _sampling(req: _SamplingFields) -> dict[str, object]:
    out: dict[str, object] = {"stop": _stops(req.stop), "ignore_eos": req.ignore_eos}
    for name in ("temperature", "top_p", "top_k", "seed"):
        value = getattr(req, name)
        if value is not None:
            out[name] = value
    return out


def _checked(fields: dict[str, object]) -> GenerateParams:
    frame = GenerateFrame(id="http", **fields)  # type: ignore[arg-type]
    problem = validate_generate(frame)
    if problem is not None:
        raise ApiError(400, problem, code="invalid_request")
    return GenerateParams(**{name: getattr(frame, name) for name in GenerateParams.__struct_fields__})


def completion_params(req: CompletionRequest) -> GenerateParams:
    _unsupported(req)
    if req.echo:
        raise _bad("`echo` is not supported; leave it out or send false.", "echo")
    if req.best_of not in (None, 1):
        raise _bad("`best_of` must be 1 or left out.", "best_of")
    if req.suffix:
        raise _bad("`suffix` is not supported; leave it out.", "suffix")
    fields = _sampling(req)
    prompt = req.prompt
    if isinstance(prompt, str):
        fields["prompt"] = prompt
    elif prompt and all(isinstance(p, int) for p in prompt):
        fields["prompt_ids"] = prompt
    elif len(prompt) == 1 and isinstance(prompt[0], str):
        fields["prompt"] = prompt[0]
    else:
        raise _bad("`prompt` must be a string, a list of token ids, or a list holding one string.", "prompt")
    if req.max_tokens is not None:
        fields["max_tokens"] = req.max_tokens
    if req.logprobs is not None:
        if not 0 <= req.logprobs <= MAX_LOGPROBS:
            raise _bad(f"`logprobs` must be in 0..{MAX_LOGPROBS} (got {req.logprobs}).", "logprobs")
        fields["logprobs"] = max(req.logprobs, 1)  # 0 still reports the chosen token's logprob
    return _checked(fields)


def chat_params(req: ChatRequest, default_max_tokens: int) -> GenerateParams:
    """Everything but the prompt, which the engine renders from the messages."""
    _unsupported(req)
    fields = _sampling(req)
    fields["prompt"] = "x"  # placeholder for the checks; the caller sets the rendered prompt
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    fields["max_tokens"] = default_max_tokens if max_tokens is None else max_tokens
    if req.top_logprobs is not None and not 0 <= req.top_logprobs <= MAX_LOGPROBS:
        raise _bad(f"`top_logprobs` must be in 0..{MAX_LOGPROBS} (got {req.top_logprobs}).", "top_logprobs")
    if req.top_logprobs and not req.logprobs:
        raise _bad("`top_logprobs` needs `logprobs` set to true.", "top_logprobs")
    if req.logprobs:
        fields["logprobs"] = max(req.top_logprobs or 0, 1)
    return _checked(fields)


def chat_messages(messages: list[ChatMessage]) -> list[dict[str, str]]:
    """Messages as plain role/content strings for `Engine.render_chat`; text parts only."""
    if not messages:
        raise _bad("`messages` must hold at least one message.", "messages")
    if len(messages) > MAX_MESSAGES:
        raise _bad(f"`messages` may hold at most {MAX_MESSAGES} messages (got {len(messages)}).", "messages")
    out: list[dict[str, str]] = []
    for i, m in enumerate(messages):
        if m.role not in CHAT_ROLES:
            raise _bad(f"`messages[{i}].role` must be one of {', '.join(sorted(CHAT_ROLES))} (got {m.role!r}).", "messages")
        content = m.content
        if isinstance(content, list):
            texts = []
            for part in content:
                if part.type != "text" or part.text is None:
                    raise _bad(f"`messages[{i}].content` may hold text parts only (got type {part.type!r}).", "messages")
                texts.append(part.text)
            content = "".join(texts)
        out.append({"role": m.role, "content": content or ""})
    return out


def finite(value: float) -> float:
    """JSON has no NaN or infinity: a -inf logprob (a token the sampler could never pick) becomes -9999."""
    return value if math.isfinite(value) else -9999.0
