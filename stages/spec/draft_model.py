"""The draft network of `speculative = "draft"`: a smaller checkpoint, or the target's first layers.

Either way it is a LlamaModel (the same code, ops and paged attention) whose
KV lives in blocks indexed by the target's block tables and slot mapping, so
the target's block manager is the only allocator:

- a separate checkpoint (`speculative_draft_model`, resolved like `model`)
  gets its own KV cache with the target's number of blocks (+1 spare, as the
  target's) and block size. It must share the target's vocabulary and
  tokenizer: its argmax ids are fed to the target as they are.
- the self-draft (no checkpoint given; LayerSkip-style) is the target's
  first L layers, its final norm and its LM head. It shares the target's KV
  cache tensors for those layers: the target's forward writes them for every
  token it computes (with the same values the draft would), so the draft is
  always caught up, and the target's verify forward rewrites every position
  the draft wrote in the same step.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import msgspec
import structlog

from overlapd.stages.engine.config import EngineConfig
from overlapd.stages.model.config import LlamaConfig
from overlapd.stages.model.llama import LlamaModel
from overlapd.stages.model.loader import LoadedModel, ModelLoadError, load_model
from overlapd.stages.model.tokenizer import TokenizerLike
from overlapd.stages.runtime.ops import Ops

log = structlog.get_logger("overlapd.spec")


@dataclass(slots=True)
class DraftModel:
    name: str  # for logs: the checkpoint's name, or "self:L"
    model: LlamaModel  # forward() over `kv_caches`, compute_logits() with a final norm and head
    kv_caches: list[Any]  # one per draft layer, indexed by the target's block tables
    shares_target_kv: bool  # the self-draft: always caught up with the target


def default_draft_layers(num_layers: int) -> int:
    """A quarter of the target's layers, at least one: LayerSkip's early exits
    sit around there, and the draft then costs about a quarter of a step."""
    return max(1, num_layers // 4)


def self_draft(target: LlamaModel, target_kv: list[Any], num_layers: int) -> DraftModel:
    """The target's first `num_layers` layers, its final norm and its LM head."""
    total = target.config.num_hidden_layers
    layers = num_layers or default_draft_layers(total)
    if not 1 <= layers < total:
        raise ModelLoadError(f"speculative_draft_layers ({layers}) must be between 1 and {total - 1}: "
                             f"the target has {total} layers")
    view = copy.copy(target)  # shallow: every weight, rope table and the ops are the target's own
    view.layers = target.layers[:layers]
    return DraftModel(f"self:{layers}", view, target_kv[:layers], shares_target_kv=True)


def load_draft_checkpoint(cfg: EngineConfig, target: LoadedModel, ops: Ops) -> LoadedModel:
    """The checkpoint `cfg.speculative_draft_model`, refused before its weights
    are read if its vocabulary differs from the target's. Its KV cache comes
    later (build_draft_model): the engine sizes the target's and the draft's
    caches together (stages/engine/sizing.py)."""
    name = cfg.speculative_draft_model
    draft_cfg = msgspec.structs.replace(
        cfg, model=name, max_model_len=target.max_model_len, speculative="off", speculative_draft_model="",
        speculative_draft_layers=0)

    def check(config: LlamaConfig, tokenizer: TokenizerLike) -> None:
        check_same_vocabulary(cfg.model, target.config, target.tokenizer, name, config, tokenizer)
        if config.max_position_embeddings < target.max_model_len:
            raise ModelLoadError(
                f"draft model {name!r} holds {config.max_position_embeddings} positions, fewer than the "
                f"target {cfg.model!r} serves (max_model_len {target.max_model_len}); lower max_model_len")

    return load_model(draft_cfg, ops, check=check)


def check_same_vocabulary(target_name: str, target_config: LlamaConfig, target_tok: TokenizerLike,
                          draft_name: str, draft_config: LlamaConfig, draft_tok: TokenizerLike) -> None:
    """ModelLoadError naming both models unless their logits index the same tokens."""
    if draft_config.vocab_size != target_config.vocab_size:
        raise ModelLoadError(
            f"draft model {draft_name!r} has a vocabulary of {draft_config.vocab_size} tokens, the target "
            f"{target_name!r} one of {target_config.vocab_size}: a draft model must share the target's tokenizer")
    if _vocabulary(draft_tok) != _vocabulary(target_tok):
        raise ModelLoadError(
            f"draft model {draft_name!r} and the target {target_name!r} have different tokenizers (the same "
            f"{target_config.vocab_size} ids stand for different tokens): a draft model must share the "
            "target's tokenizer")


def _vocabulary(tok: TokenizerLike) -> object:
    """What must be equal for two tokenizers to give ids the same meaning."""
    vocab = getattr(tok, "vocab", None)
    return vocab() if callable(vocab) else (type(tok).__name__, tok.vocab_size)


def build_draft_model(cfg: EngineConfig, target: LoadedModel, ops: Ops, target_kv: list[Any],
                      num_blocks: int, checkpoint: LoadedModel | None = None) -> DraftModel:
    """The draft network `cfg` asks for (speculative = "draft"): a separate
    checkpoint (`checkpoint` where the caller loaded it already) with a KV
    cache of the target's layout (num_blocks + 1 blocks of cfg.block_size),
    or the target's first layers over the target's cache."""
    if cfg.speculative_draft_model:
        loaded = checkpoint if checkpoint is not None else load_draft_checkpoint(cfg, target, ops)
        kv = loaded.model.allocate_kv_caches(num_blocks + 1, cfg.block_size)
        draft = DraftModel(cfg.speculative_draft_model, loaded.model, kv, shares_target_kv=False)
    else:
        draft = self_draft(target.model, target_kv, cfg.speculative_draft_layers)
    log.info("draft_model_ready", draft=draft.name, target=cfg.model, layers=len(draft.kv_caches),
             shares_target_kv=draft.shares_target_kv)
    return draft
