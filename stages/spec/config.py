"""Speculative decoding settings, checked once (from EngineConfig's `speculative*` keys)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from overlapd.stages.engine.config import EngineConfig

SPEC_METHODS = ("off", "ngram", "draft")
MAX_SPECULATIVE_TOKENS = 8  # T = k + 1 columns per ring row; verify rows take k + 1 query slots


@dataclass(frozen=True, slots=True)
class SpecConfig:
    method: str  # one of SPEC_METHODS
    num_tokens: int  # k: drafts proposed per verify step, 1..MAX_SPECULATIVE_TOKENS
    ngram_max: int  # the proposer looks for the last n tokens, n = ngram_max down to ngram_min
    ngram_min: int
    # method "draft": a checkpoint resolved like EngineConfig.model; "" = the
    # self-draft, the target's first `draft_layers` layers (0: a quarter of them)
    draft_model: str = ""
    draft_layers: int = 0
    max_batch: int = 0  # steps draft nothing while more requests than this run; 0 = no limit

    @property
    def enabled(self) -> bool:
        return self.method != "off"

    @property
    def columns(self) -> int:
        """T: token columns of a verify row (its input token and k drafts)."""
        return self.num_tokens + 1

    @property
    def self_draft(self) -> bool:
        """The draft method without a draft checkpoint: the target's first layers draft."""
        return self.method == "draft" and not self.draft_model


def spec_config(method: str, num_tokens: int, ngram_max: int, ngram_min: int, draft_model: str = "",
                draft_layers: int = 0, max_batch: int = 0) -> SpecConfig:
    """A checked SpecConfig; ValueError names the bad key."""
    if method not in SPEC_METHODS:
        raise ValueError(f"speculative must be one of {', '.join(SPEC_METHODS)}, not {method!r}")
    if not 1 <= num_tokens <= MAX_SPECULATIVE_TOKENS:
        raise ValueError(f"num_speculative_tokens must be between 1 and {MAX_SPECULATIVE_TOKENS}, not {num_tokens}")
    if not 1 <= ngram_min <= ngram_max <= 16:
        raise ValueError(f"speculative_ngram_min ({ngram_min}) and speculative_ngram_max ({ngram_max}) "
                         "must satisfy 1 <= min <= max <= 16")
    if draft_layers < 0:
        raise ValueError(f"speculative_draft_layers must be >= 0 (0 = a quarter of the target's layers), "
                         f"not {draft_layers}")
    if draft_layers and draft_model:
        raise ValueError(f"speculative_draft_layers ({draft_layers}) picks the target's own first layers as the "
                         f"draft; it cannot go with speculative_draft_model ({draft_model!r})")
    if max_batch < 0:
        raise ValueError(f"speculative_max_batch must be >= 0 (0 = speculate at any batch size), not {max_batch}")
    return SpecConfig(method, num_tokens, ngram_max, ngram_min, draft_model, draft_layers, max_batch)


def spec_config_of(cfg: EngineConfig) -> SpecConfig:
    """The engine's speculative settings (checked when the EngineConfig was made)."""
    return spec_config(cfg.speculative, cfg.num_speculative_tokens, cfg.speculative_ngram_max,
                       cfg.speculative_ngram_min, cfg.speculative_draft_model, cfg.speculative_draft_layers,
                       cfg.speculative_max_batch)
