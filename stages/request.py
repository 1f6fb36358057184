"""One generation request as the scheduler tracks it, and its admission checks.

The token sequence of a request is `prompt + outputs + placeholders`: outputs
are tokens already read back on the host, placeholders are tokens a step in
flight is still sampling (overlap mode). The scheduler only ever advances
`num_computed_tokens` (KV positions computed or scheduled) and the number of
placeholders; `update()` turns placeholders into outputs, in step order.
"""

from __future__ import annotations

import math
from enum import Enum
from typing import AbstractSet, Iterable, Sequence

from .step_types import MAX_LOGPROBS, STOP_TABLE_WIDTH, FinishReason, SamplingParams, TokenStops

U64_MAX = (1 << 64) - 1
I64_MAX = (1 << 63) - 1


class RequestStatus(Enum):
    WAITING = "waiting"  # never scheduled yet, or put back after preemption
    RUNNING = "running"  # holds KV blocks and a persistent row in the runner
    PREEMPTED = "preempted"  # waiting again; its KV is gone and will be recomputed
    FINISHED = "finished"


class InvalidRequest(ValueError):
    """A request the engine refuses; `field` names the offending field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class Request:
    __slots__ = (
        "req_id",
        "prompt_token_ids",
        "params",
        "seed",
        "arrival",
        "output_token_ids",
        "status",
        "num_computed_tokens",
        "block_ids",
        "num_placeholders",
        "finish_reason",
        "num_preemptions",
        "last_sample_step",
        "stops",
        "block_keys",
        "num_keyed_blocks",
        "num_draft_computed",
    )

    def __init__(
        self,
        req_id: int,
        prompt_token_ids: Sequence[int],
        params: SamplingParams,
        seed: int,
        arrival: int,
    ) -> None:
        self.req_id = req_id
        self.prompt_token_ids: list[int] = list(prompt_token_ids)
        self.params = params
        self.seed = seed  # the user's seed, or one the scheduler drew at admission
        self.arrival = arrival  # admission order: the priority for scheduling and preemption
        self.output_token_ids: list[int] = []
        self.status = RequestStatus.WAITING
        self.num_computed_tokens = 0
        self.block_ids: list[int] = []
        self.num_placeholders = 0  # sampled by a step in flight, not yet on the host
        self.finish_reason: FinishReason | None = None
        self.num_preemptions = 0
        self.last_sample_step = 0  # step id of the latest row that sampled for this request
        self.stops: TokenStops | None = None  # set by the scheduler at admission (it knows eos and the context)
        # Prefix cache: the keys of the sequence's leading full blocks (they
        # depend on the tokens only, so they outlive preemption), and how many
        # blocks of the table are cached (keyed here, or found in the cache).
        self.block_keys: list[bytes] = []
        self.num_keyed_blocks = 0
        # Speculative "draft" with a separate draft model: leading positions whose
        # draft-model KV is valid (stages/spec/draft_plan.py); 0 again when the
        # request's KV is released.
        self.num_draft_computed = 0

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_outputs(self) -> int:
        """Outputs generated so far, counting those still in flight."""
        return len(self.output_token_ids) + self.num_placeholders

    @property
    def num_tokens(self) -> int:
        """Length of the sequence including placeholders."""
        return len(self.prompt_token_ids) + self.num_outputs

    @property
    def num_known_tokens(self) -> int:
        """Prompt and outputs already on the host (placeholders excluded)."""
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_tokens_to_compute(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def token_ids_slice(self, start: int, end: int) -> list[int]:
        """Known tokens at positions [start, end); placeholders come out as -1."""
        prompt = self.prompt_token_ids
        n_prompt = len(prompt)
        known_end = n_prompt + len(self.output_token_ids)
        out: list[int] = []
        if start < n_prompt:
            out.extend(prompt[start : min(end, n_prompt)])
        if end > n_prompt and start < known_end:
            out.extend(self.output_token_ids[max(start, n_prompt) - n_prompt : min(end, known_end) - n_prompt])
        if end > known_end:
            out.extend([-1] * (end - max(start, known_end)))
        return out

    def __repr__(self) -> str:
        return (
            f"Request(id={self.req_id}, {self.status.value}, prompt={self.num_prompt_tokens}, "
            f"outputs={len(self.output_token_ids)}+{self.num_placeholders}, "
            f"computed={self.num_computed_tokens}, blocks={len(self.block_ids)})"
        )


def _check_token_ids(field: str, ids: Sequence[int], vocab_size: int) -> None:
    for i, t in enumerate(ids):
        if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab_size:
            raise InvalidRequest(field, f"token id {t!r} at index {i} is outside the vocabulary 0..{vocab_size - 1}")


def validate_request(
    prompt_ids: Sequence[int],
    params: SamplingParams,
    vocab_size: int,
    max_model_len: int,
) -> None:
    """Raise InvalidRequest naming the first bad field; return None if the request is admissible.

    prompt + max_tokens over the context is rejected, not clamped (as vLLM
    does): a silently shortened answer looks like a model that stopped on its
    own, while the error tells the client the largest max_tokens that fits.
    """
    n = len(prompt_ids)
    if n == 0:
        raise InvalidRequest("prompt", "the prompt is empty; give at least one token")
    _check_token_ids("prompt_ids", prompt_ids, vocab_size)
    if n >= max_model_len:
        raise InvalidRequest(
            "prompt",
            f"the prompt has {n} tokens but the context is {max_model_len} tokens; "
            f"it must be at most {max_model_len - 1} to leave room for an output token",
        )
    p = params
    _check_max_tokens(p)
    if n + p.max_tokens > max_model_len:
        raise InvalidRequest(
            "max_tokens",
            f"prompt ({n} tokens) + max_tokens ({p.max_tokens}) exceeds the context of "
            f"{max_model_len} tokens; use max_tokens <= {max_model_len - n}",
        )
    _check_sampling(p, vocab_size)


def validate_sampling(params: SamplingParams, vocab_size: int, max_model_len: int) -> None:
    """The checks that need no prompt: what can be refused before a text prompt is tokenized."""
    p = params
    _check_max_tokens(p)
    if p.max_tokens > max_model_len - 1:
        raise InvalidRequest(
            "max_tokens",
            f"max_tokens ({p.max_tokens}) leaves no room for a prompt in the context of "
            f"{max_model_len} tokens; use max_tokens <= {max_model_len - 1}",
        )
    _check_sampling(p, vocab_size)


def _check_max_tokens(p: SamplingParams) -> None:
    if not isinstance(p.max_tokens, int) or p.max_tokens < 1:
        raise InvalidRequest("max_tokens", f"must be at least 1, got {p.max_tokens!r}")


def _check_sampling(p: SamplingParams, vocab_size: int) -> None:
    if not math.isfinite(p.temperature) or p.temperature < 0:
        raise InvalidRequest("temperature", f"must be a finite number >= 0 (0 = greedy), got {p.temperature!r}")
    if not math.isfinite(p.top_p) or not 0.0 < p.top_p <= 1.0:
        raise InvalidRequest("top_p", f"must be in (0, 1], got {p.top_p!r}")
    # The upper bound: top_k is staged in an int64 buffer (any value >= the
    # vocabulary size already keeps every token).
    if not 0 <= p.top_k <= I64_MAX:
        raise InvalidRequest("top_k", f"must be in 0..2**63-1 (0 = off), got {p.top_k!r}")
    if not 0 <= p.logprobs <= MAX_LOGPROBS:
        raise InvalidRequest("logprobs", f"must be in 0..{MAX_LOGPROBS}, got {p.logprobs!r}")
    for i, s in enumerate(p.stop):
        if not isinstance(s, str) or not s:
            raise InvalidRequest("stop", f"stop string at index {i} is empty; every stop string needs a character")
    _check_token_ids("stop_token_ids", p.stop_token_ids, vocab_size)
    if p.seed is not None and (isinstance(p.seed, bool) or not 0 <= p.seed <= U64_MAX):
        raise InvalidRequest("seed", f"must be in 0..2**64-1 or null, got {p.seed!r}")


def validate_fits_cache(num_prompt: int, max_tokens: int, cache_tokens: int) -> None:
    """Refuse a request larger than the whole KV cache: it would preempt
    everyone and then itself, forever."""
    if num_prompt > cache_tokens:
        raise InvalidRequest("prompt", f"the prompt has {num_prompt} tokens but the KV cache holds {cache_tokens}")
    # The last output's KV is never computed: prompt + max_tokens - 1 positions.
    if num_prompt + max_tokens - 1 > cache_tokens:
        raise InvalidRequest(
            "max_tokens",
            f"prompt ({num_prompt}) + max_tokens ({max_tokens}) needs more KV than the cache "
            f"holds ({cache_tokens} tokens); use max_tokens <= {cache_tokens - num_prompt + 1}",
        )


def token_stop_reason(
    req: Request, token: int, eos_token_ids: AbstractSet[int], max_model_len: int
) -> FinishReason | None:
    """The token-level stop conditions, checked after `token` was appended.

    Stop strings are text-level: the output processor checks those.
    """
    p = req.params
    if not p.ignore_eos and token in eos_token_ids:
        return FinishReason.EOS
    if token in p.stop_token_ids:
        return FinishReason.STOP
    if len(req.output_token_ids) >= p.max_tokens:
        return FinishReason.LENGTH
    if req.num_prompt_tokens + len(req.output_token_ids) >= max_model_len:
        return FinishReason.LENGTH
    return None


def token_stops(
    params: SamplingParams, eos_token_ids: Iterable[int], num_prompt_tokens: int, max_model_len: int
) -> TokenStops:
    """`token_stop_reason`'s conditions as the device checks them: one list of
    stop ids in precedence order (eos first) and one output limit."""
    eos = [] if params.ignore_eos else sorted(set(eos_token_ids))
    ids = list(dict.fromkeys([*eos, *params.stop_token_ids]))  # first occurrence wins: eos before stop
    return TokenStops(tuple(ids), len(eos), min(params.max_tokens, max_model_len - num_prompt_tokens))


def device_stop_reason(code: int, token: int, stops: TokenStops) -> FinishReason | None:
    """The device's finish code for `token`, completed with the stop ids that did
    not fit its table; equals `token_stop_reason` for the request the stops were
    built for (the tests compare the two)."""
    if not code and len(stops.ids) <= STOP_TABLE_WIDTH:
        return None  # the common row: running, every stop id on the device
    if code in (FinishReason.EOS, FinishReason.STOP):
        return FinishReason(code)
    overflow = stops.overflow
    if overflow and token in overflow:
        # The ids are distinct, so the table did not hold this one: the device
        # saw no id and at most the length limit, which an id outranks.
        at = len(stops.ids) - len(overflow) + overflow.index(token)
        return FinishReason.EOS if at < stops.num_eos else FinishReason.STOP
    return FinishReason(code) if code else None
