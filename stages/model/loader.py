"""Turning EngineConfig.model into a runnable model: config, weights, tokenizer.

Sources, in the order they are tried:
- a packaged model (packaged.py): the default, SmolLM2-135M-Instruct, a GGUF
  file that a Python package ships;
- "tiny": the small random-weight model for tests, created once under the
  user's cache as an HF directory and then loaded like any other (tiny.py);
- a `.gguf` file: config, weights (dequantized at load) and tokenizer from the
  file (gguf_checkpoint.py, gguf_tokenizer.py);
- a directory: a Hugging Face checkpoint (config.json, *.safetensors or a
  sharded model.safetensors.index.json, tokenizer.json);
- with load_format="dummy": a named shape (config.NAMED_SHAPES) or any of the
  above, with seeded random weights (random_weights.py), drawn on the device
  where the runtime runs on one and can draw them (Torch on a GPU).
A model without a tokenizer gets the byte-level fallback (tokenizer.py), and
one without a chat template a plain one (chat_template.py).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Protocol

import numpy as np
import structlog

from ..engine.config import TINY_MODEL, EngineConfig
from ..engine.sizing import DEFAULT_MAX_MODEL_LEN_CAP, resolve_max_model_len
from ..parallel.sharding import Shard, ShardPlan, padding_rows, plan_shard, take
from ..runtime.ops import FLOAT_DTYPES, Ops, Tensor
from .chat_template import ChatTemplate, ChatTemplateError
from .config import NAMED_SHAPES, LlamaConfig, ModelConfigError, read_json_object
from .gguf_checkpoint import GGUFCheckpoint, GGUFError
from .gguf_tokenizer import special_token_text, tokenizer_from_gguf
from .llama import LlamaModel, param_layout
from .packaged import PACKAGED_MODELS, packaged_model_path
from .random_weights import device_random_weight, random_weight
from .safetensors_io import CheckpointFiles
from .tiny import ensure_tiny_checkpoint
from .tokenizer import ByteTokenizer, Tokenizer, TokenizerLike

LOAD_FORMATS = ("auto", "dummy")
_PROGRESS_PARAMETERS = 500_000_000  # smaller models load in seconds: no progress lines
log = structlog.get_logger("overlapd.model")


class _WeightSource(Protocol):
    def shapes(self) -> dict[str, tuple[int, ...]]: ...
    def get(self, name: str) -> np.ndarray: ...


class ModelLoadError(ValueError):
    """A model that cannot be loaded; the message names the file, field or tensor."""


@dataclass(slots=True)
class LoadedModel:
    name: str  # what EngineConfig.model said
    path: Path | None  # the checkpoint directory or .gguf file, None for a named dummy shape
    config: LlamaConfig
    model: LlamaModel
    tokenizer: TokenizerLike
    eos_token_ids: tuple[int, ...]
    max_model_len: int
    dtype: str
    chat_template: ChatTemplate


# Called with the config and tokenizer of a model before its weights are read
# (a draft model's are checked against its target's); raises to refuse it.
SourceCheck = Callable[[LlamaConfig, TokenizerLike], None]


def load_model(cfg: EngineConfig, ops: Ops, shard: Shard | None = None,
               check: SourceCheck | None = None) -> LoadedModel:
    """The model, whole, or with a `shard` only the slice that tensor-parallel
    rank holds (each rank reads the same checkpoint and keeps its part);
    `check` may refuse its config and tokenizer before any weight is read."""
    if cfg.load_format not in LOAD_FORMATS:
        raise ModelLoadError(f"load_format must be one of {LOAD_FORMATS}, got {cfg.load_format!r}")
    if cfg.dtype not in FLOAT_DTYPES:
        raise ModelLoadError(f"dtype must be one of {FLOAT_DTYPES}, got {cfg.dtype!r}")
    t0 = time.monotonic()
    source = _resolve(cfg)
    config = source.config
    if check is not None:
        check(config, source.tokenizer)
    try:
        max_len = resolve_max_model_len(cfg, config)
        plan = plan_shard(config, shard) if shard is not None else None
    except ValueError as e:
        raise ModelLoadError(str(e)) from None
    if cfg.load_format == "dummy" and ops.device != "cpu" and hasattr(ops, "random_normal"):
        params = device_random_params(config, ops, cfg.seed, cfg.dtype, plan)
    else:
        weights = _RandomWeights(config, cfg.seed) if cfg.load_format == "dummy" else source.weights()
        params = _load_params(config, weights, ops, cfg.dtype, plan)
    model = LlamaModel(config, ops, params, max_len, plan)
    log.info("model_loaded", model=cfg.model, path=str(source.path) if source.path else None,
             load_format=cfg.load_format, parameters=config.num_parameters(), dtype=cfg.dtype,
             seconds=round(time.monotonic() - t0, 1),
             **({"tensor_parallel_rank": shard.rank, "tensor_parallel_size": shard.size} if shard else {}))
    return LoadedModel(cfg.model, source.path, config, model, source.tokenizer, source.eos, max_len, cfg.dtype,
                       source.chat_template)


def build_model(config: LlamaConfig, weights: dict[str, np.ndarray], ops: Ops, dtype: str = "float32",
                max_model_len: int | None = None) -> LlamaModel:
    """A model from HF-named arrays already in memory (tests, conversions)."""
    source = _DictWeights(weights)
    params = _load_params(config, source, ops, dtype)
    return LlamaModel(config, ops, params, max_model_len or min(config.max_position_embeddings, DEFAULT_MAX_MODEL_LEN_CAP))


@dataclass(slots=True)
class _Source:
    """Everything a model name resolves to, weights not yet read."""

    path: Path | None
    config: LlamaConfig
    weights: Callable[[], _WeightSource]  # opened only when the weights are read (not for dummy)
    tokenizer: TokenizerLike
    eos: tuple[int, ...]
    chat_template: ChatTemplate


def _resolve(cfg: EngineConfig) -> _Source:
    if cfg.model in PACKAGED_MODELS:
        try:
            return _gguf_source(packaged_model_path(cfg.model))
        except FileNotFoundError as e:
            raise ModelLoadError(str(e)) from None
    if cfg.model == TINY_MODEL:
        return _dir_source(ensure_tiny_checkpoint())
    if cfg.model in NAMED_SHAPES:
        if cfg.load_format != "dummy":
            raise ModelLoadError(
                f"model {cfg.model!r} is a named shape without weights; use load_format='dummy'")
        config = NAMED_SHAPES[cfg.model]
        eos = config.eos_token_ids
        return _Source(None, config, lambda: _RandomWeights(config, cfg.seed),
                       ByteTokenizer(config.vocab_size, config.bos_token_id, eos), eos, ChatTemplate(None))
    path = Path(cfg.model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return _gguf_source(path)
    if not path.is_dir():
        raise ModelLoadError(
            f"model {cfg.model!r}: no such directory or .gguf file. Expected {sorted(PACKAGED_MODELS)[0]!r} "
            f"(the default), {TINY_MODEL!r}, a .gguf file, a Hugging Face checkpoint directory, or with "
            f"load_format='dummy' one of {sorted(NAMED_SHAPES)}")
    return _dir_source(path)


def _dir_source(path: Path) -> _Source:
    try:
        config = LlamaConfig.from_dir(path)
    except ModelConfigError as e:
        raise ModelLoadError(str(e)) from None
    eos = _eos_ids(path, config)
    tokenizer = _tokenizer(path, config, eos)
    return _Source(path, config, lambda: _CheckpointWeights(path), tokenizer, eos,
                   _dir_chat_template(path, _prepends_bos(tokenizer)))


def _gguf_source(path: Path) -> _Source:
    try:
        ckpt = GGUFCheckpoint(path)
        meta = ckpt.metadata
        tok = Tokenizer(tokenizer_from_gguf(meta), ckpt.config.bos_token_id, ckpt.config.eos_token_ids)
        bos = "" if _prepends_bos(tok) else special_token_text(meta, "bos")
        template = ChatTemplate(ckpt.chat_template, bos, special_token_text(meta, "eos"))
    except (GGUFError, ChatTemplateError) as e:
        raise ModelLoadError(str(e)) from None
    except ValueError as e:
        raise ModelLoadError(f"{path}: {e}") from None
    return _Source(path, ckpt.config, lambda: ckpt, tok, ckpt.config.eos_token_ids, template)


def _prepends_bos(tokenizer: TokenizerLike) -> bool:
    """Whether encoding adds bos itself: then a template's `{{ bos_token }}` must render empty,
    or the prompt would start with two (the daemon encodes rendered chats like any prompt)."""
    ids = tokenizer.encode("")
    return bool(ids) and ids[0] == tokenizer.bos_token_id


def _dir_chat_template(path: Path, prepends_bos: bool) -> ChatTemplate:
    """tokenizer_config.json's chat_template (a string) and special tokens, else the plain template."""
    file = path / "tokenizer_config.json"
    try:
        d = read_json_object(file) if file.is_file() else {}
    except ModelConfigError as e:
        raise ModelLoadError(str(e)) from None
    source = d.get("chat_template")

    def text(name: str) -> str:  # a token is a string or {"content": ...}
        v = d.get(name)
        v = v.get("content") if isinstance(v, dict) else v
        return v if isinstance(v, str) else ""

    try:
        return ChatTemplate(source if isinstance(source, str) else None,
                            "" if prepends_bos else text("bos_token"), text("eos_token"))
    except ChatTemplateError as e:
        raise ModelLoadError(f"{file}: {e}") from None


class _CheckpointWeights:
    def __init__(self, path: Path) -> None:
        try:
            self._files = CheckpointFiles.open(path)
        except ValueError as e:
            raise ModelLoadError(str(e)) from None

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return self._files.shapes()

    def get(self, name: str) -> np.ndarray:
        return self._files.get(name)


class _DictWeights:
    def __init__(self, weights: dict[str, np.ndarray]) -> None:
        self._w = weights

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in self._w.items()}

    def get(self, name: str) -> np.ndarray:
        return self._w[name]


class _RandomWeights:
    def __init__(self, config: LlamaConfig, seed: int) -> None:
        self._config, self._seed = config, seed
        self._shapes = {n: s for src in param_layout(config).values() for n, s in src}

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return self._shapes

    def get(self, name: str) -> np.ndarray:
        return random_weight(self._config, name, self._shapes[name], self._seed)


def _check_shapes(config: LlamaConfig, available: dict[str, tuple[int, ...]]) -> None:
    """Every tensor the config implies must be present with the shape it implies."""
    problems: list[str] = []
    missing: list[str] = []
    for sources in param_layout(config).values():
        for name, shape in sources:
            if name not in available:
                missing.append(name)
            elif tuple(available[name]) != shape:
                problems.append(f"tensor {name} has shape {list(available[name])}, "
                                f"but config.json implies {list(shape)}")
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        problems.insert(0, f"checkpoint lacks {len(missing)} tensors: {', '.join(missing[:5])}{more}")
    if problems:
        raise ModelLoadError("; ".join(problems[:6]))


def _load_params(config: LlamaConfig, source: _WeightSource, ops: Ops,
                 dtype: str, plan: ShardPlan | None = None) -> dict[str, Tensor]:
    """Every parameter (or a rank's slice of each) on the device; a big model
    logs its progress every quarter."""
    _check_shapes(config, source.shapes())
    params: dict[str, Tensor] = {}
    total, done, reported, t0 = config.num_parameters(), 0, 0, time.monotonic()
    if plan is not None:
        total = max(1, total // plan.size)  # about this rank's share
    for name, arrays in _fused_arrays(config, source, plan):
        params[name] = ops.from_numpy(arrays, dtype)
        done += arrays.size
        quarter = 4 * done // total
        if total >= _PROGRESS_PARAMETERS and quarter > reported:
            reported = quarter
            log.info("loading_weights", done_pct=min(100, 25 * quarter), parameters=total,
                     elapsed_s=round(time.monotonic() - t0, 1))
    return params


def device_random_params(config: LlamaConfig, ops: Ops, seed: int, dtype: str,
                         plan: ShardPlan | None = None) -> dict[str, Tensor]:
    """Dummy weights drawn on the runtime's device, one parameter at a time
    (q/k/v and gate/up concatenated there), cast to `dtype`; with a `plan`,
    each drawn whole (the same values as unsharded) and sliced."""
    params: dict[str, Tensor] = {}
    for name, sources in param_layout(config).items():
        parts = [device_random_weight(ops, config, hf, shape, seed) for hf, shape in sources]
        if plan is not None:
            parts = [_device_slice(ops, plan, config, hf, p) for (hf, _), p in zip(sources, parts)]
        fused = parts[0] if len(parts) == 1 else ops.concat(parts, axis=0)
        params[name] = ops.cast(fused, dtype)
    return params


def _device_slice(ops: Ops, plan: ShardPlan, config: LlamaConfig, hf_name: str, x: Tensor) -> Tensor:
    part = ops.add(take(plan, config, hf_name, x), 0.0)  # a copy, so the whole draw is freed
    pad = padding_rows(plan, hf_name)
    return ops.concat([part, ops.zeros([pad, part.shape[1]], "float32")], axis=0) if pad else part


def _fused_arrays(config: LlamaConfig, source: _WeightSource,
                  plan: ShardPlan | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """One model parameter at a time (q/k/v and gate/up concatenated), float32;
    with a `plan`, the rank's slice of each tensor, taken before the float32 copy."""
    for name, sources in param_layout(config).items():
        parts = [_host_part(config, plan, source, hf) for hf, _ in sources]
        yield name, parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)


def _host_part(config: LlamaConfig, plan: ShardPlan | None, source: _WeightSource, hf_name: str) -> np.ndarray:
    a = source.get(hf_name)
    if plan is None:
        return np.asarray(a, dtype=np.float32)
    part = np.asarray(take(plan, config, hf_name, a), dtype=np.float32)
    pad = padding_rows(plan, hf_name)
    return np.concatenate([part, np.zeros((pad, part.shape[1]), np.float32)]) if pad else part


def _eos_ids(path: Path | None, config: LlamaConfig) -> tuple[int, ...]:
    """config.json's eos ids plus generation_config.json's (chat models list more there)."""
    ids = list(config.eos_token_ids)
    gen = path / "generation_config.json" if path is not None else None
    if gen is not None and gen.is_file():
        try:
            extra = json.loads(gen.read_text(encoding="utf-8")).get("eos_token_id")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
            raise ModelLoadError(f"{gen} is not a valid JSON object: {e}") from None
        for i in extra if isinstance(extra, list) else ([extra] if extra is not None else []):
            if int(i) not in ids:
                ids.append(int(i))
    return tuple(ids)


def _tokenizer(path: Path | None, config: LlamaConfig, eos: tuple[int, ...]) -> TokenizerLike:
    file = path / "tokenizer.json" if path is not None else None
    if file is not None and file.is_file():
        try:
            return Tokenizer.from_file(file, config.bos_token_id, eos)
        except ValueError as e:
            raise ModelLoadError(str(e)) from None
    return ByteTokenizer(config.vocab_size, config.bos_token_id, eos)


__all__ = ["LOAD_FORMATS", "LoadedModel", "ModelLoadError", "build_model", "device_random_params", "load_model"]
