"""The ops layer: everything the model, the sampler and the runner ask of a framework.

This Protocol and the modules implementing it (`paddle_ops.py`, later
`torch_ops.py`) are the only code that knows a framework exists. The rest of
the engine holds framework tensors as opaque `Tensor` values and may use only
`x.shape` (a sequence of ints) and basic first-axis slicing `x[a:b]` on them
(both frameworks return views for that); everything else goes through an
`Ops` method, so adding a runtime is one module.

Conventions every implementation keeps:
- dtypes are the strings in `DTYPES`; index tensors are int64.
- Weights use the Hugging Face layout: a linear weight is [out, in].
- Methods ending in `_` write into their first argument in place and keep its
  device address (persistent buffers are captured by CUDA graphs later).
- Nothing in the forward or sampling path reads device memory on the host;
  only `to_numpy` / `to_host_async` do, and the runner calls them once a step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np

Tensor = Any  # a framework tensor; only ops implementations look inside

FLOAT32 = "float32"
BFLOAT16 = "bfloat16"
FLOAT16 = "float16"
INT32 = "int32"
INT64 = "int64"
BOOL = "bool"
DTYPES = (FLOAT32, BFLOAT16, FLOAT16, INT32, INT64, BOOL)
FLOAT_DTYPES = (FLOAT32, BFLOAT16, FLOAT16)


@dataclass(slots=True)
class AttentionMetadata:
    """The layout of one mixed step (prefill chunks and decodes), for attention.

    Device tensors are in step-row order. The host arrays mirror what the runner
    staged, so an implementation can choose shapes and groupings without
    reading the device (a CUDA kernel would use them for its launch grid).
    """

    num_tokens: int
    num_rows: int
    block_size: int
    positions: Tensor  # int64 [num_tokens]
    token_rows: Tensor  # int64 [num_tokens]: the step row each token belongs to
    query_start_loc: Tensor  # int64 [num_rows + 1]
    seq_lens: Tensor  # int64 [num_rows]: tokens in the KV cache after this step
    block_tables: Tensor  # int64 [num_rows, max_blocks_per_seq]
    slot_mapping: Tensor  # int64 [num_tokens]: block_id * block_size + offset
    query_lens_host: np.ndarray  # int64 [num_rows]
    seq_lens_host: np.ndarray  # int64 [num_rows]


@runtime_checkable
class HostFuture(Protocol):
    """A device-to-host copy in flight; `result()` waits for it."""

    def result(self) -> np.ndarray: ...


class Ops(Protocol):
    name: str  # "paddle" | "torch"
    device: str  # "cpu" | "gpu"

    # --- creation and host transfer -------------------------------------
    def empty(self, shape: Sequence[int], dtype: str) -> Tensor: ...
    def zeros(self, shape: Sequence[int], dtype: str) -> Tensor: ...
    def full(self, shape: Sequence[int], value: float | int, dtype: str) -> Tensor: ...
    def arange(self, n: int, dtype: str = INT64) -> Tensor: ...
    def from_numpy(self, a: np.ndarray, dtype: str | None = None) -> Tensor:
        """A new device tensor holding a copy of `a` (cast to `dtype` when given)."""
        ...
    def to_numpy(self, x: Tensor) -> np.ndarray:
        """Waits for the device; bfloat16 comes back as float32."""
        ...
    def to_host_async(self, x: Tensor) -> HostFuture:
        """Starts copying `x` to the host; never blocks where the runtime allows."""
        ...
    def host_zeros(self, shape: Sequence[int], dtype: str) -> np.ndarray:
        """A zeroed host array that `copy_from_host_` uploads directly (page-locked
        where the device needs it). The caller must not refill it while an
        upload from it may still be in flight."""
        ...
    def copy_from_host_(self, dst: Tensor, src: np.ndarray) -> None:
        """dst[:len(src)] = src, in place (dst keeps its address)."""
        ...
    def copy_(self, dst: Tensor, src: Tensor) -> None:
        """dst[:len(src)] = src for a device src, in place."""
        ...
    def data_ptr(self, x: Tensor) -> int: ...
    def dtype_of(self, x: Tensor) -> str: ...
    def cast(self, x: Tensor, dtype: str) -> Tensor: ...

    # --- shape ------------------------------------------------------------
    def reshape(self, x: Tensor, shape: Sequence[int]) -> Tensor: ...
    def split(self, x: Tensor, sizes: Sequence[int], axis: int = -1) -> list[Tensor]: ...
    def concat(self, xs: Sequence[Tensor], axis: int = 0) -> Tensor: ...
    def unsqueeze(self, x: Tensor, axis: int) -> Tensor: ...

    # --- indexing -----------------------------------------------------------
    def index_select(self, x: Tensor, index: Tensor, axis: int = 0) -> Tensor: ...
    def gather(self, x: Tensor, index: Tensor, axis: int) -> Tensor:
        """Take along `axis` (numpy's take_along_axis): index has x's rank."""
        ...
    def scatter_rows_(self, dst: Tensor, index: Tensor, src: Tensor) -> None:
        """dst[index[i]] = src[i] along axis 0, in place; indices are distinct."""
        ...
    def searchsorted(self, sorted_seq: Tensor, values: Tensor, right: bool = False) -> Tensor: ...

    # --- elementwise ------------------------------------------------------
    # Binary ops accept a Python scalar as `b`; int64 results never overflow
    # silently only if the caller keeps values below 2**63 (the sampler's hash does).
    def add(self, a: Tensor, b: Tensor | float | int) -> Tensor: ...
    def sub(self, a: Tensor, b: Tensor | float | int) -> Tensor: ...
    def mul(self, a: Tensor, b: Tensor | float | int) -> Tensor: ...
    def div(self, a: Tensor, b: Tensor | float | int) -> Tensor: ...
    def floor_divide(self, a: Tensor, b: Tensor | int) -> Tensor: ...
    def remainder(self, a: Tensor, b: Tensor | int) -> Tensor: ...
    def bitwise_xor(self, a: Tensor, b: Tensor) -> Tensor: ...
    def maximum(self, a: Tensor, b: Tensor | float | int) -> Tensor: ...
    def minimum(self, a: Tensor, b: Tensor | float | int) -> Tensor: ...
    def where(self, cond: Tensor, a: Tensor | float | int, b: Tensor | float | int) -> Tensor: ...
    def lt(self, a: Tensor, b: Tensor | float | int) -> Tensor: ...
    def le(self, a: Tensor, b: Tensor | float | int) -> Tensor: ...
    def gt(self, a: Tensor, b: Tensor | float | int) -> Tensor: ...
    def ge(self, a: Tensor, b: Tensor | float | int) -> Tensor: ...
    def logical_and(self, a: Tensor, b: Tensor) -> Tensor: ...

    # --- reductions and sorting ---------------------------------------------
    def sum(self, x: Tensor, axis: int, keepdim: bool = False, dtype: str | None = None) -> Tensor: ...
    def cumsum(self, x: Tensor, axis: int) -> Tensor: ...
    def argmax(self, x: Tensor, axis: int) -> Tensor: ...
    def topk(self, x: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """Largest k along the last axis, descending: (values, int64 indices)."""
        ...
    def argsort_descending(self, x: Tensor) -> Tensor:
        """int64 indices sorting the last axis from largest to smallest."""
        ...
    def softmax(self, x: Tensor, axis: int = -1) -> Tensor: ...
    def log_softmax(self, x: Tensor, axis: int = -1) -> Tensor: ...

    # --- model building blocks ----------------------------------------------
    def embedding(self, ids: Tensor, weight: Tensor) -> Tensor: ...
    def linear(self, x: Tensor, weight: Tensor) -> Tensor:
        """x @ weight.T with weight in [out, in] layout."""
        ...
    def rms_norm(self, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        """Normalizes in float32 and returns x's dtype."""
        ...
    def rope_tables(self, cos: np.ndarray, sin: np.ndarray) -> Any:
        """Device RoPE tables from float32 [max_positions, D // 2] cos and sin (built once)."""
        ...
    def rope_plan(self, positions: Tensor, tables: Any) -> Any:
        """Per-step rotations for `positions` (built once a forward, shared by every layer)."""
        ...
    def rotary_embedding(self, x: Tensor, plan: Any) -> Tensor:
        """Neox-style (rotate-half, as HF Llama) RoPE on x [T, H, D]; q and k heads may come stacked."""
        ...
    def silu_and_mul(self, x: Tensor) -> Tensor:
        """[..., 2n] -> silu(x[..., :n]) * x[..., n:]"""
        ...
    def add_rms_norm(self, x: Tensor, residual: Tensor | None, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
        """(rms_norm(residual + x), residual + x); with no residual, (rms_norm(x), x).
        May overwrite `residual` with the sum (composed.py is the reference)."""
        ...
    def rope_and_cache_kv(self, qkv: Tensor, num_q_heads: int, num_kv_heads: int, rope: Any, cache: Any,
                          plan: Any) -> Tensor:
        """qkv [T, Hq + 2 Hk, D]: RoPE on q and k, k and v stored at the step's slots; returns q [T, Hq, D]."""
        ...

    # --- paged KV cache and attention -------------------------------------
    def allocate_kv_cache(
        self, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: str
    ) -> Any:
        """One layer's K and V cache; the layout is the runtime's business."""
        ...
    def attention_plan(self, meta: AttentionMetadata, cache: Any) -> Any:
        """Per-step work shared by every layer's KV writes and attention (built once a
        forward; `cache` is any layer's, they share one geometry)."""
        ...
    def write_kv_cache_(self, cache: Any, k: Tensor, v: Tensor, plan: Any) -> None:
        """Stores k, v [T, Hk, D] at the step's slots (meta.slot_mapping), in place."""
        ...
    def paged_attention(self, q: Tensor, cache: Any, plan: Any, scale: float) -> Tensor:
        """Causal attention of q [T, Hq, D] over the cached keys of each token's
        row (grouped-query: Hq is a multiple of Hk); returns [T, Hq * D]."""
        ...

    # --- tensor parallelism (stages/parallel/; only a sharded model calls these) ---
    def all_reduce_(self, x: Tensor) -> None:
        """x = the sum of every rank's x, in place (x keeps its address)."""
        ...
    def all_gather(self, x: Tensor, axis: int = -1) -> Tensor:
        """Every rank's x (equal shapes) concatenated along `axis`, in rank order."""
        ...

    # --- device ---------------------------------------------------------------
    def synchronize(self) -> None: ...
    def current_stream_handle(self) -> int:
        """The raw stream (cudaStream_t as an int) work is queued on; 0 on the CPU."""
        ...
