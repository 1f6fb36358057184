"""The ops layer on Paddle (the default runtime).

Runs on the CPU build here and is written for a GPU build too: nothing in the
forward or sampling path calls `.numpy()`; host data only goes in through
`from_numpy` / `copy_from_host_` and comes out through `to_numpy` /
`to_host_async`.
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Sequence

import numpy as np

from . import composed
from .ops import INT64, AttentionMetadata, Tensor


def _tune_cpu_blas() -> None:
    """Choose MKL's threading before Paddle's bundled MKL first initializes.

    Measured on a 2-core AMD host (bench/engine.py): the bundled MKL 2019
    takes a slow generic path on AMD CPUs unless MKL_DEBUG_CPU_TYPE=5 (about
    2x on batched matmuls; ignored on Intel). More threads help big matmuls
    only while cores are idle; when other work shares the cores, spinning
    OpenMP workers made small matmuls 10x slower, so use half the cores
    (the pipeline's own threads need the rest) and never spin
    (KMP_BLOCKTIME=0). setdefault: values the user set win.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    os.environ.setdefault("MKL_NUM_THREADS", str(max(1, cores // 2)))
    os.environ.setdefault("KMP_BLOCKTIME", "0")
    os.environ.setdefault("MKL_DEBUG_CPU_TYPE", "5")


_tune_cpu_blas()

with warnings.catch_warnings():
    # Paddle's import warns that ccache (for building C++ extensions) is missing:
    # noise for a daemon that builds none.
    warnings.filterwarnings("ignore", message="No ccache found")
    import paddle  # noqa: E402  (the environment above must be set first)
    import paddle.nn.functional as F  # noqa: E402

# Paddle turns SIGTERM/SIGINT into an abort with a C++ backtrace; the daemon
# drains on SIGTERM instead, so the signals stay Python's.
paddle.disable_signal_handler()

from .paddle_attention import AttentionPlan, PagedKV, build_plan, paged_attention  # noqa: E402

_DTYPES = {
    "float32": paddle.float32,
    "bfloat16": paddle.bfloat16,
    "float16": paddle.float16,
    "int32": paddle.int32,
    "int64": paddle.int64,
    "bool": paddle.bool,
}
_NAMES = {v: k for k, v in _DTYPES.items()}

# Arrays at least this large are copied with to_tensor (see from_numpy).
_BULK_ELEMENTS = 1 << 16

class _Ready:
    """A host copy that is already complete (the CPU) or done on demand."""

    def __init__(self, ops: "PaddleOps", x: Tensor) -> None:
        self._ops, self._x, self._host = ops, x, None

    def result(self) -> np.ndarray:
        if self._host is None:
            self._host = self._ops.to_numpy(self._x)
            self._x = None
        return self._host


class PaddleOps:
    name = "paddle"

    def __init__(self, device: str = "cpu") -> None:
        if device not in ("cpu", "gpu"):
            raise ValueError(f"device must be 'cpu' or 'gpu', got {device!r}")
        if device == "gpu" and not paddle.device.is_compiled_with_cuda():
            raise RuntimeError("device='gpu' needs a paddlepaddle-gpu build; this Paddle is CPU-only")
        self.device = device
        # Tensors made here have stop_gradient=True, so no autograd graph is built.
        paddle.set_device(device)

    # --- creation and host transfer -------------------------------------
    def empty(self, shape: Sequence[int], dtype: str) -> Tensor:
        return paddle.empty(list(shape), dtype=_DTYPES[dtype])

    def zeros(self, shape: Sequence[int], dtype: str) -> Tensor:
        return paddle.zeros(list(shape), dtype=_DTYPES[dtype])

    def full(self, shape: Sequence[int], value: float | int, dtype: str) -> Tensor:
        return paddle.full(list(shape), value, dtype=_DTYPES[dtype])

    def arange(self, n: int, dtype: str = INT64) -> Tensor:
        return paddle.arange(n, dtype=_DTYPES[dtype])

    def from_numpy(self, a: np.ndarray, dtype: str | None = None) -> Tensor:
        # Not paddle.to_tensor for step-sized arrays: in Paddle 3.3.1 every
        # tensor it makes is never freed (~110 B each, measured), a leak per
        # engine step in a daemon. But assign copies element by element through
        # Python lists (11 s for SmolLM2's 28M-element embedding), so large
        # arrays, which only model loading makes, take to_tensor.
        a = np.ascontiguousarray(a)
        x = paddle.to_tensor(a) if a.size >= _BULK_ELEMENTS else paddle.assign(a)
        return x if dtype is None or _NAMES[x.dtype] == dtype else x.astype(_DTYPES[dtype])

    def to_numpy(self, x: Tensor) -> np.ndarray:
        if x.dtype == paddle.bfloat16:
            x = x.astype(paddle.float32)  # numpy has no bfloat16
        return x.numpy()

    def to_host_async(self, x: Tensor) -> _Ready:
        # Paddle's pinned tensors move to the GPU when touched from Python, so
        # a true async handoff lives in kernels/; here the copy happens at
        # result() (on the CPU the data is already final when launch returns).
        return _Ready(self, x)

    def host_zeros(self, shape: Sequence[int], dtype: str) -> np.ndarray:
        return np.zeros(shape, dtype)  # uploads go through Paddle's own copy

    def copy_from_host_(self, dst: Tensor, src: np.ndarray) -> None:
        n = len(src)
        if n:
            dst[:n] = np.ascontiguousarray(src, dtype=_np_dtype(dst.dtype))

    def copy_(self, dst: Tensor, src: Tensor) -> None:
        n = src.shape[0]
        if n:
            paddle.assign(src, output=dst[:n])

    def data_ptr(self, x: Tensor) -> int:
        return int(x.data_ptr())

    def dtype_of(self, x: Tensor) -> str:
        return _NAMES[x.dtype]

    def cast(self, x: Tensor, dtype: str) -> Tensor:
        return x if _NAMES[x.dtype] == dtype else x.astype(_DTYPES[dtype])

    # --- shape ------------------------------------------------------------
    def reshape(self, x: Tensor, shape: Sequence[int]) -> Tensor:
        return paddle.reshape(x, list(shape))

    def split(self, x: Tensor, sizes: Sequence[int], axis: int = -1) -> list[Tensor]:
        return paddle.split(x, list(sizes), axis=axis)

    def concat(self, xs: Sequence[Tensor], axis: int = 0) -> Tensor:
        return paddle.concat(list(xs), axis=axis)

    def unsqueeze(self, x: Tensor, axis: int) -> Tensor:
        return paddle.unsqueeze(x, axis)

    # --- indexing -----------------------------------------------------------
    def index_select(self, x: Tensor, index: Tensor, axis: int = 0) -> Tensor:
        return paddle.index_select(x, index, axis=axis)

    def gather(self, x: Tensor, index: Tensor, axis: int) -> Tensor:
        return paddle.take_along_axis(x, index, axis=axis)

    def scatter_rows_(self, dst: Tensor, index: Tensor, src: Tensor) -> None:
        if index.shape[0]:
            paddle.scatter_(dst, index, src, overwrite=True)

    def searchsorted(self, sorted_seq: Tensor, values: Tensor, right: bool = False) -> Tensor:
        return paddle.searchsorted(sorted_seq, values, right=right)

    # --- elementwise ------------------------------------------------------
    def add(self, a: Tensor, b: Tensor | float | int) -> Tensor:
        return a + b

    def sub(self, a: Tensor, b: Tensor | float | int) -> Tensor:
        return a - b

    def mul(self, a: Tensor, b: Tensor | float | int) -> Tensor:
        return a * b

    def div(self, a: Tensor, b: Tensor | float | int) -> Tensor:
        return a / b

    def floor_divide(self, a: Tensor, b: Tensor | int) -> Tensor:
        return a // b

    def remainder(self, a: Tensor, b: Tensor | int) -> Tensor:
        return a % b

    def bitwise_xor(self, a: Tensor, b: Tensor) -> Tensor:
        return paddle.bitwise_xor(a, b)

    def maximum(self, a: Tensor, b: Tensor | float | int) -> Tensor:
        return paddle.maximum(a, b if isinstance(b, paddle.Tensor) else paddle.full_like(a, b))

    def minimum(self, a: Tensor, b: Tensor | float | int) -> Tensor:
        return paddle.minimum(a, b if isinstance(b, paddle.Tensor) else paddle.full_like(a, b))

    def where(self, cond: Tensor, a: Tensor | float | int, b: Tensor | float | int) -> Tensor:
        # Python scalars become tensors through the same leaking path as
        # paddle.to_tensor; full_like does not leak.
        if not isinstance(a, paddle.Tensor):
            a = paddle.full_like(b if isinstance(b, paddle.Tensor) else cond, a,
                                 dtype=b.dtype if isinstance(b, paddle.Tensor) else paddle.float32)
        if not isinstance(b, paddle.Tensor):
            b = paddle.full_like(a, b)
        return paddle.where(cond, a, b)

    def lt(self, a: Tensor, b: Tensor | float | int) -> Tensor:
        return a < b

    def le(self, a: Tensor, b: Tensor | float | int) -> Tensor:
        return a <= b

    def gt(self, a: Tensor, b: Tensor | float | int) -> Tensor:
        return a > b

    def ge(self, a: Tensor, b: Tensor | float | int) -> Tensor:
        return a >= b

    def logical_and(self, a: Tensor, b: Tensor) -> Tensor:
        return paddle.logical_and(a, b)

    # --- reductions and sorting ---------------------------------------------
    def sum(self, x: Tensor, axis: int, keepdim: bool = False, dtype: str | None = None) -> Tensor:
        return paddle.sum(x, axis=axis, keepdim=keepdim, dtype=None if dtype is None else _DTYPES[dtype])

    def cumsum(self, x: Tensor, axis: int) -> Tensor:
        return paddle.cumsum(x, axis=axis)

    def argmax(self, x: Tensor, axis: int) -> Tensor:
        return paddle.argmax(x, axis=axis)

    def topk(self, x: Tensor, k: int) -> tuple[Tensor, Tensor]:
        values, indices = paddle.topk(x, k, axis=-1, largest=True, sorted=True)
        return values, indices

    def argsort_descending(self, x: Tensor) -> Tensor:
        # stable: equal values keep index order, so a row's result never
        # depends on the sort kernel's choices
        return paddle.argsort(x, axis=-1, descending=True, stable=True)

    def softmax(self, x: Tensor, axis: int = -1) -> Tensor:
        return F.softmax(x, axis=axis)

    def log_softmax(self, x: Tensor, axis: int = -1) -> Tensor:
        return F.log_softmax(x, axis=axis)

    # --- model building blocks ----------------------------------------------
    def embedding(self, ids: Tensor, weight: Tensor) -> Tensor:
        return F.embedding(ids, weight)

    def linear(self, x: Tensor, weight: Tensor) -> Tensor:
        return paddle.matmul(x, weight, transpose_y=True)

    def rms_norm(self, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        # Paddle's fused rms_norm has no CPU kernel; this is the HF formula:
        # normalize in float32, cast back, then scale.
        x32 = x if x.dtype == paddle.float32 else x.astype(paddle.float32)
        var = paddle.scale(paddle.mean(x32 * x32, axis=-1, keepdim=True), 1.0, eps)  # + eps without a full()
        normed = x32 * paddle.rsqrt(var)
        return (normed if x.dtype == paddle.float32 else normed.astype(x.dtype)) * weight

    def rope_tables(self, cos: np.ndarray, sin: np.ndarray) -> tuple[Tensor, Tensor]:
        # full-width tables with rotate-half's sign folded in: x*C + roll(x, D/2)*S
        # equals HF's x*cos + rotate_half(x)*sin in four ops
        return (paddle.assign(np.concatenate([cos, cos], axis=-1)),
                paddle.assign(np.concatenate([-sin, sin], axis=-1)))

    def rope_plan(self, positions: Tensor, tables: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        n, d = positions.shape[0], tables[0].shape[1]
        return (paddle.reshape(paddle.index_select(tables[0], positions), [n, 1, d]),
                paddle.reshape(paddle.index_select(tables[1], positions), [n, 1, d]))

    def rotary_embedding(self, x: Tensor, plan: tuple[Tensor, Tensor]) -> Tensor:
        c, s = plan
        if c.dtype != x.dtype:
            c, s = c.astype(x.dtype), s.astype(x.dtype)
        return x * c + paddle.roll(x, x.shape[-1] // 2, axis=-1) * s

    def silu_and_mul(self, x: Tensor) -> Tensor:
        return F.swiglu(x)  # one op: splits x in halves itself

    add_rms_norm = composed.add_rms_norm
    rope_and_cache_kv = composed.rope_and_cache_kv

    # --- paged KV cache and attention -------------------------------------
    def allocate_kv_cache(
        self, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: str
    ) -> PagedKV:
        return PagedKV.allocate(num_blocks, block_size, num_kv_heads, head_dim, _DTYPES[dtype])

    def write_kv_cache_(self, cache: PagedKV, k: Tensor, v: Tensor, plan: AttentionPlan) -> None:
        cache.write_(k, v, plan)

    def attention_plan(self, meta: AttentionMetadata, cache: PagedKV) -> AttentionPlan:
        return build_plan(meta, cache.k.shape[0], cache.k.shape[1] * cache.k.shape[2])

    def paged_attention(self, q: Tensor, cache: PagedKV, plan: AttentionPlan, scale: float) -> Tensor:
        return paged_attention(q, cache, plan, scale)

    # --- device ---------------------------------------------------------------
    def synchronize(self) -> None:
        if self.device == "gpu":
            paddle.device.synchronize()

    def current_stream_handle(self) -> int:
        if self.device != "gpu":
            return 0
        stream = paddle.device.current_stream()
        for attr in ("cuda_stream", "stream_base"):
            handle = getattr(stream, attr, None)
            if isinstance(handle, int):
                return handle
            if handle is not None and isinstance(getattr(handle, "cuda_stream", None), int):
                return handle.cuda_stream
        raise RuntimeError("this Paddle build does not expose the raw CUDA stream handle")


def _np_dtype(dtype: Any) -> Any:
    return {paddle.float32: np.float32, paddle.int64: np.int64, paddle.int32: np.int32,
            paddle.bool: np.bool_, paddle.float16: np.float16}[dtype]
