"""Range rules for a `generate` frame (SPEC 2.2), after msgspec checked the types.

Each rule returns a sentence that names the field and says what to send
instead; the first broken rule wins so the client fixes one thing at a time.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from .protocol import GenerateFrame

MAX_ID_CHARS: Final = 256
MAX_STOP_STRINGS: Final = 16
MAX_STOP_CHARS: Final = 256
MAX_LOGPROBS: Final = 20
TOKEN_ID_LIMIT: Final = 1 << 31  # token ids are i32 in the ring (SPEC 1.3)
SEED_LIMIT: Final = 1 << 64


def _bad_token_id(ids: list[int]) -> tuple[int, int] | None:
    for i, t in enumerate(ids):
        if not 0 <= t < TOKEN_ID_LIMIT:
            return i, t
    return None


def _check_id(f: GenerateFrame) -> str | None:
    if not 0 < len(f.id) <= MAX_ID_CHARS:
        return f"`id` must be a non-empty string of at most {MAX_ID_CHARS} characters (got {len(f.id)})."
    return None


def _check_prompt(f: GenerateFrame) -> str | None:
    if (f.prompt is None) == (f.prompt_ids is None):
        which = "both" if f.prompt is not None else "neither"
        return f"Send exactly one of `prompt` (a string) or `prompt_ids` (a list of token ids); this frame has {which}."
    if f.prompt is not None and not f.prompt:
        return "`prompt` must not be empty."
    if f.prompt_ids is not None:
        if not f.prompt_ids:
            return "`prompt_ids` must not be empty."
        bad = _bad_token_id(f.prompt_ids)
        if bad is not None:
            return f"`prompt_ids[{bad[0]}]` is {bad[1]}; token ids must be in [0, 2^31)."
    return None


def _check_sampling(f: GenerateFrame) -> str | None:
    if f.max_tokens < 1:
        return f"`max_tokens` must be at least 1 (got {f.max_tokens})."
    if not math.isfinite(f.temperature) or f.temperature < 0:
        return f"`temperature` must be a finite number >= 0, 0 meaning greedy (got {f.temperature})."
    if not math.isfinite(f.top_p) or not 0 < f.top_p <= 1:
        return f"`top_p` must be in (0, 1] (got {f.top_p})."
    if f.top_k < 0:
        return f"`top_k` must be >= 0, 0 meaning off (got {f.top_k})."
    if f.seed is not None and not 0 <= f.seed < SEED_LIMIT:
        return f"`seed` must be nil or an integer in [0, 2^64) (got {f.seed})."
    if not 0 <= f.logprobs <= MAX_LOGPROBS:
        return f"`logprobs` must be in 0..{MAX_LOGPROBS} (got {f.logprobs})."
    return None


def _check_stops(f: GenerateFrame) -> str | None:
    if len(f.stop) > MAX_STOP_STRINGS:
        return f"`stop` may hold at most {MAX_STOP_STRINGS} strings (got {len(f.stop)})."
    for i, s in enumerate(f.stop):
        if not 0 < len(s) <= MAX_STOP_CHARS:
            return f"`stop[{i}]` must be a non-empty string of at most {MAX_STOP_CHARS} characters (got {len(s)})."
    bad = _bad_token_id(f.stop_token_ids)
    if bad is not None:
        return f"`stop_token_ids[{bad[0]}]` is {bad[1]}; token ids must be in [0, 2^31)."
    return None


_RULES = (_check_id, _check_prompt, _check_sampling, _check_stops)


def validate_generate(frame: GenerateFrame) -> str | None:
    """None when the frame is acceptable, else the first problem as a sentence."""
    for rule in _RULES:
        problem = rule(frame)
        if problem is not None:
            return problem
    return None
