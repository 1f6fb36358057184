"""Random Llama weights in a real shape: the tiny model's and `load_format="dummy"`.

Each tensor is drawn from its own generator seeded by (seed, tensor name), so a
tensor can be made alone, in any order, and always comes out the same: the
loader creates a 1B-parameter model one tensor at a time without holding all
of it twice.

Two sources with the same distributions: numpy on the host (`random_weight`,
the tiny checkpoint and the CPU runtimes), and the runtime's own generator on
its device (`device_random_weight`, where the ops have `random_normal`): an
8B shape is drawn there in about a second instead of pushing 16 GB of numpy
draws through the host (the 1B shape took 19 s that way). The two give
different numbers for the same seed; each is deterministic.
"""

from __future__ import annotations

import zlib

import numpy as np

from ..runtime.ops import FLOAT32, INT64, Ops, Tensor
from .config import LlamaConfig


def _scale(config: LlamaConfig, name: str, shape: tuple[int, ...]) -> tuple[float, float]:
    """(mean, std) of a tensor's normal draw; see random_weight for why."""
    if name.endswith("norm.weight"):
        return 1.0, 0.1
    is_head = name == "lm_head.weight" or (name == "model.embed_tokens.weight" and config.tie_word_embeddings)
    if name == "model.embed_tokens.weight" and not is_head:
        return 0.0, 1.0
    fan_in = shape[1] if len(shape) == 2 else config.hidden_size
    return 0.0, (3.0 if is_head else 1.0) / float(np.sqrt(fan_in))


def _zero_rows(config: LlamaConfig, name: str, rows: int) -> list[int]:
    """The untied head's bos and eos rows (random_weight says why)."""
    if name != "lm_head.weight":
        return []
    return [i for i in (config.bos_token_id, *config.eos_token_ids) if i is not None and 0 <= i < rows]


def device_random_weight(ops: Ops, config: LlamaConfig, name: str, shape: tuple[int, ...], seed: int) -> Tensor:
    """One float32 HF tensor drawn on the runtime's device (ops.random_normal),
    with random_weight's distribution."""
    mean, std = _scale(config, name, shape)
    # the low 32 bits alone must differ too (a CPU generator keeps only those)
    key = (seed << 32) ^ zlib.crc32(f"{seed}:{name}".encode())
    w = ops.random_normal(list(shape), key, mean, std)  # type: ignore[attr-defined]
    zero = _zero_rows(config, name, shape[0])
    if zero:
        ops.scatter_rows_(w, ops.from_numpy(np.asarray(zero, np.int64), INT64),
                          ops.zeros([len(zero), *shape[1:]], FLOAT32))
    return w


def random_weight(config: LlamaConfig, name: str, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """One float32 HF tensor, scaled so that every sublayer matters.

    Projections have std 1/sqrt(fan_in): activations stay unit-scale, so
    attention and the MLP move the residual stream as much as the embedding.
    Norm weights are near 1 but not exactly, so a missing scale shows. The
    output head gives logits of std ~3 (the embedding too when tied). An
    untied head's rows for bos and eos are zero: their logit is exactly 0,
    far below the largest random logit, so greedy decoding of a random model
    never stops on eos at once (see tiny.py). A tied head keeps them: a zero
    input embedding would make the bos position's hidden state exactly zero,
    which RMSNorm (1/sqrt(eps)) then amplifies from rounding noise.
    """
    rng = np.random.Generator(np.random.PCG64([seed, zlib.crc32(name.encode())]))
    h = config.hidden_size
    if name.endswith("norm.weight"):
        return (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
    is_head = name == "lm_head.weight" or (name == "model.embed_tokens.weight" and config.tie_word_embeddings)
    if name == "model.embed_tokens.weight" and not is_head:
        return rng.standard_normal(shape, dtype=np.float32)
    w = rng.standard_normal(shape, dtype=np.float32)
    w *= np.float32((3.0 if is_head else 1.0) / np.sqrt(shape[1] if len(shape) == 2 else h))
    if name == "lm_head.weight":
        specials = [i for i in (config.bos_token_id, *config.eos_token_ids) if i is not None and 0 <= i < shape[0]]
        w[specials] = 0.0
    return w
