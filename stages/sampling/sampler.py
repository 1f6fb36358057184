"""Token sampling on the device: greedy, temperature, top-k, top-p, seeds, logprobs.

Reproducibility is the design constraint: a seeded request must give the same
tokens however it is batched. So no batch-wide RNG is ever used. Each
persistent row keeps a 31-bit seed state on the device; a row's random number
for a step is a fixed integer hash of that state alone, turned into a uniform
and used for inverse-CDF sampling over its own (sorted, filtered)
distribution. After a step every row that sampled advances its state in place
by an odd increment modulo 2**31 (FastDeploy's infer_seed += increment, with
wrap-around). The state for output token i of a request is therefore
(base(seed) + i * increment) mod 2**31, which is also how a row is initialized
when a request (re)enters the batch, so recompute after preemption continues
the same stream.

Every row takes the same computation (a full sort of its scaled logits, then
top-k and top-p as prefix masks), whatever the other rows ask for, so the
path cannot depend on the batch. Greedy rows (temperature 0) take the argmax
of the raw logits. Where the runtime has a fused sampler (`fused_sample`:
kernels/triton_sampling.py on a GPU) it replaces the sort and the argmax:
the same kept set up to ties at its boundary, drawn by rejection rounds keyed
by the same seed state, so the same distribution but not the ops path's
token for a seed; every step of a runtime takes the same path, graphs or not.
Its logprobs come from kernels/triton_logprobs.py (`fused_logprobs`).

Logprobs are those of the model's raw distribution (log_softmax of the
unscaled, unfiltered logits), as vLLM returns by default: they describe the
model, not the sampling settings, and stay comparable across requests.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from overlapd.kernels import step_kernels

from ..runtime.ops import FLOAT32, INT64, Ops, Tensor

SEED_BITS = 31
SEED_MODULUS = 1 << SEED_BITS
SEED_INCREMENT = 0x1E3779B1  # odd, so the walk visits all 2**31 states
_HASH_MUL = 0x45D9F3B  # < 2**27: products of 32-bit values stay below 2**59 in int64
_MASK32 = 1 << 32


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


def seed_state(seed: int, output_index: int) -> int:
    """The device seed state of a request's row when it will sample output `output_index`."""
    base = _splitmix64(seed & 0xFFFFFFFFFFFFFFFF) % SEED_MODULUS
    return (base + output_index * SEED_INCREMENT) % SEED_MODULUS


def uniform_from_state(state: np.ndarray) -> np.ndarray:
    """Host mirror of `Sampler.uniforms` (for tests): float32 in [0, 1)."""
    x = np.asarray(state, dtype=np.int64)
    x = (((x >> 16) ^ x) * _HASH_MUL) % _MASK32
    x = (((x >> 16) ^ x) * _HASH_MUL) % _MASK32
    x = (x >> 16) ^ x
    return (x >> 8).astype(np.float32) * np.float32(2.0**-24)


@dataclass(slots=True)
class SamplingTensors:
    """Per-step-row sampling parameters on the device, [R] each."""

    temperature: Tensor  # float32, 0 = greedy
    top_p: Tensor  # float32 in (0, 1]
    top_k: Tensor  # int64, 0 = off
    seed_state: Tensor  # int64 in [0, 2**31)
    uniform: Tensor | None = None  # float32: uniforms(seed_state) where already computed (the CUDA kernel)


class PersistentSamplingParams:
    """Sampling parameters per persistent row, written only when a request enters a row."""

    def __init__(self, ops: Ops, max_rows: int, use_kernels: bool | None = None) -> None:
        self.ops = ops
        self.temperature = ops.zeros([max_rows], FLOAT32)
        self.top_p = ops.full([max_rows], 1.0, FLOAT32)
        self.top_k = ops.zeros([max_rows], INT64)
        self.seed_state = ops.zeros([max_rows], INT64)
        # None: the CUDA kernel wherever it can run (tests pass False for the ops path)
        self.use_kernels = step_kernels.available(ops) if use_kernels is None else use_kernels

    def build(self, row_slots: Tensor, sample_mask: Tensor, column: Tensor, *, advance: bool) -> SamplingTensors:
        """The step's per-row parameters (FastDeploy's build_sampling_params): a
        verify row's column j (column >= 0) samples with its slot's seed state
        moved j outputs on; with `advance`, plain rows (column < 0) that sample
        move their slot's state on, after it was read (verify rows move theirs
        in DeviceInputs.settle_verified_, once their accept counts exist)."""
        ops = self.ops
        if self.use_kernels:
            r = row_slots.shape[0]
            out = SamplingTensors(ops.empty([r], FLOAT32), ops.empty([r], FLOAT32), ops.empty([r], INT64),
                                  ops.empty([r], INT64), ops.empty([r], FLOAT32))
            if step_kernels.build_sampling_params(
                    ops, self.temperature, self.top_p, self.top_k, self.seed_state, row_slots, sample_mask, column,
                    out.temperature, out.top_p, out.top_k, out.seed_state, out.uniform, advance=advance):
                return out
        state = ops.index_select(self.seed_state, row_slots)  # a copy: the step keeps the old states
        params = SamplingTensors(
            ops.index_select(self.temperature, row_slots),
            ops.index_select(self.top_p, row_slots),
            ops.index_select(self.top_k, row_slots),
            moved_seed_state(ops, state, ops.maximum(column, 0)),
        )
        if advance:
            # a verify row's columns share a slot: they all write its state back unchanged
            plain_sample = ops.logical_and(ops.gt(sample_mask, 0), ops.lt(column, 0))
            moved = moved_seed_state(ops, state, 1)
            ops.scatter_rows_(self.seed_state, row_slots, ops.where(plain_sample, moved, state))
        return params


def moved_seed_state(ops: Ops, state: Tensor, outputs: Tensor | int) -> Tensor:
    """Seed states `outputs` samples further on: (state + outputs * increment) mod 2**31."""
    step = outputs * SEED_INCREMENT if isinstance(outputs, int) else ops.mul(outputs, SEED_INCREMENT)
    return ops.remainder(ops.add(state, step), SEED_MODULUS)


@dataclass(slots=True)
class SamplerOutput:
    sampled: Tensor  # int64 [R]
    # int64 [R, 2] without logprobs, [R, 3 + k] with: sampled, finish code,
    # then rank and the top-k ids (all in the step's one device-to-host copy)
    ints: Tensor
    logprobs: Tensor | None  # float32 [R, k + 1]: sampled token's, then the top-k


class Sampler:
    def __init__(self, ops: Ops, vocab_size: int, sort_dtype: str = FLOAT32) -> None:
        self.ops = ops
        self.vocab_size = vocab_size
        # Logits of a bfloat16 model are bfloat16 values held in float32; dividing
        # by a temperature keeps their order and ties, so sorting them as bfloat16
        # gives the same stable order with half the key bits (a radix sort's passes).
        self.sort_dtype = sort_dtype
        self._ranks = ops.reshape(ops.arange(vocab_size, INT64), [1, vocab_size])

    def uniforms(self, state: Tensor) -> Tensor:
        """float32 [R] in [0, 1) from int64 states in [0, 2**31): a 32-bit integer hash."""
        ops = self.ops
        x = state
        for _ in range(2):
            x = ops.remainder(ops.mul(ops.bitwise_xor(ops.floor_divide(x, 1 << 16), x), _HASH_MUL), _MASK32)
        x = ops.bitwise_xor(ops.floor_divide(x, 1 << 16), x)
        return ops.mul(ops.cast(ops.floor_divide(x, 1 << 8), FLOAT32), 2.0**-24)

    def __call__(self, logits: Tensor, params: SamplingTensors, *, any_random: bool, num_logprobs: int,
                 finish: Tensor | None = None) -> SamplerOutput:
        """`sample` then `pack` (finish None: all zeros)."""
        sampled = self.sample(logits, params, any_random=any_random)
        if finish is None:
            finish = self.ops.zeros([logits.shape[0]], INT64)
        return self.pack(logits, sampled, finish, num_logprobs)

    def sample(self, logits: Tensor, params: SamplingTensors, *, any_random: bool) -> Tensor:
        """int64 [R] from float32 logits [R, V]. `any_random` is a host fact about
        the step (it chooses which work runs, never a row's result)."""
        ops = self.ops
        kernel = getattr(ops, "fused_sample", None)
        if any_random and kernel is not None:  # no sort, and greedy rows' argmax inside
            return kernel(logits, params.temperature, params.top_p, params.top_k, params.seed_state,
                          key_bits=16 if self.sort_dtype == "bfloat16" else 32)
        greedy = ops.argmax(logits, axis=-1)
        return ops.where(ops.gt(params.temperature, 0.0), self._sample(logits, params), greedy) \
            if any_random else greedy

    def pack(self, logits: Tensor, sampled: Tensor, finish: Tensor, num_logprobs: int) -> SamplerOutput:
        """The step's outputs: `finish` (int64 [R], the rows' stop codes) rides in
        `ints` with the sampled ids; logprobs when `num_logprobs` (a host fact) > 0."""
        ops = self.ops
        rows = logits.shape[0]
        column = ops.reshape(sampled, [rows, 1])
        stops = ops.reshape(finish, [rows, 1])
        if num_logprobs == 0:
            return SamplerOutput(sampled, ops.concat([column, stops], axis=1), None)
        fused = getattr(ops, "fused_logprobs", None)
        if fused is not None:  # kernels/triton_logprobs.py: the same layout, no [R, V] log_softmax
            ints, lps = fused(logits, sampled, finish, num_logprobs)
            return SamplerOutput(sampled, ints, lps)
        lp = ops.log_softmax(logits, axis=-1)
        top_lp, top_ids = ops.topk(lp, num_logprobs)
        sampled_lp = ops.gather(lp, column, axis=-1)
        rank = ops.add(ops.sum(ops.gt(lp, sampled_lp), axis=-1, keepdim=True, dtype=INT64), 1)
        ints = ops.concat([column, stops, rank, top_ids], axis=1)
        return SamplerOutput(sampled, ints, ops.concat([sampled_lp, top_lp], axis=1))

    def _sample(self, logits: Tensor, p: SamplingTensors) -> Tensor:
        ops = self.ops
        u = p.uniform if p.uniform is not None else self.uniforms(p.seed_state)
        rows, vocab = logits.shape[0], self.vocab_size
        temp = ops.where(ops.gt(p.temperature, 0.0), p.temperature, 1.0)
        scaled = ops.div(logits, ops.reshape(temp, [rows, 1]))
        order = ops.argsort_descending(scaled if self.sort_dtype == FLOAT32 else ops.cast(logits, self.sort_dtype))
        probs = ops.softmax(ops.gather(scaled, order, axis=-1), axis=-1)
        # top-k and top-p keep a prefix of the sorted vocabulary (never empty:
        # the first token has rank 0 < k and nothing before it)
        k = ops.where(ops.gt(p.top_k, 0), ops.minimum(p.top_k, vocab), vocab)
        keep = ops.lt(self._ranks, ops.reshape(k, [rows, 1]))
        before = ops.sub(ops.cumsum(probs, axis=-1), probs)
        keep = ops.logical_and(keep, ops.lt(before, ops.reshape(p.top_p, [rows, 1])))
        cdf = ops.cumsum(ops.where(keep, probs, 0.0), axis=-1)
        total = ops.gather(cdf, ops.full([rows, 1], vocab - 1, INT64), axis=-1)
        target = ops.mul(ops.reshape(u, [rows, 1]), total)
        idx = ops.sum(ops.le(cdf, target), axis=-1, keepdim=True, dtype=INT64)
        # rounding can put target at the total: stay inside the kept prefix
        idx = ops.minimum(idx, ops.sub(ops.sum(keep, axis=-1, keepdim=True, dtype=INT64), 1))
        return ops.reshape(ops.gather(order, idx, axis=-1), [rows])


__all__ = ["PersistentSamplingParams", "Sampler", "SamplerOutput", "SamplingTensors",
           "seed_state", "uniform_from_state", "SEED_INCREMENT", "SEED_MODULUS"]
