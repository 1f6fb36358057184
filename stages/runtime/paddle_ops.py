"""The ops layer on Paddle (the default runtime).

Runs on the CPU build here and is written for a GPU build too: nothing in the
forward or sampling path calls `.numpy()`; host data only goes in through
`from_numpy` / `copy_from_host_` and comes out through `to_numpy` /
`to_host_async`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from .ops import INT64, AttentionMetadata, Tensor


def _tune_cpu_blas() -> None:
    """Let Paddle's bundled MKL use every core before it first initializes.

    Paddle's CPU build runs MKL with one thread unless MKL_NUM_THREADS says
    otherwise (measured: 2x on a 2-core host for batched matmuls), and the
    bundled MKL 2019 takes its slow generic path on AMD CPUs unless
    MKL_DEBUG_CPU_TYPE=5 (measured: about 2x more at batch 64; ignored on
    Intel CPUs). setdefault: a value the user set wins.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    os.environ.setdefault("MKL_NUM_THREADS", str(cores or 1))
    os.environ.setdefault("MKL_DEBUG_CPU_TYPE", "5")


_tune_cpu_blas()

import paddle  # noqa: E402  (the environment above must be set first)
import paddle.nn.functional as F  # noqa: E402

_DTYPES = {
    "float32": paddle.float32,
    "bfloat16": paddle.bfloat16,
    "float16": paddle.float16,
    "int32": paddle.int32,
    "int64": paddle.int64,
    "bool": paddle.bool,
}
_NAMES = {v: k for k, v in _DTYPES.items()}
# Finite "minus infinity" for masked attention scores: a fully masked padding
# row then gives a harmless uniform softmax instead of NaNs.
_MASKED = -1e30


class _Ready:
    """A host copy that is already complete (the CPU) or done on demand."""

    def __init__(self, ops: "PaddleOps", x: Tensor) -> None:
        self._ops, self._x, self._host = ops, x, None

    def result(self) -> np.ndarray:
        if self._host is None:
            self._host = self._ops.to_numpy(self._x)
            self._x = None
        return self._host


@dataclass(slots=True)
class PagedKV:
    """One layer's cache: slot-major [num_blocks * block_size, kv_heads, head_dim]."""

    k: Tensor
    v: Tensor
    block_size: int


@dataclass(slots=True)
class _Group:
    """Rows attended together, padded to `qlen` queries and `kvlen` keys each."""

    rows: int
    qlen: int
    kvlen: int
    tok_idx: Tensor  # int64 [rows * qlen]: the step token behind each padded query
    kv_slots: Tensor  # int64 [rows * kvlen]: the cache slot behind each padded key
    bias: Tensor  # float32 [rows, 1, qlen, 1, kvlen]: 0 where causal-visible, else masked


@dataclass(slots=True)
class _Plan:
    groups: list[_Group]
    out_index: Tensor | None  # int64 [T] into the concatenated padded outputs; None: identity


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
        x = paddle.to_tensor(np.ascontiguousarray(a))
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
        x32 = x.astype(paddle.float32) if x.dtype != paddle.float32 else x
        normed = x32 * paddle.rsqrt(paddle.mean(x32 * x32, axis=-1, keepdim=True) + eps)
        return normed.astype(x.dtype) * weight

    def rotary_embedding(
        self, positions: Tensor, q: Tensor, k: Tensor, cos: Tensor, sin: Tensor
    ) -> tuple[Tensor, Tensor]:
        c = paddle.index_select(cos, positions).unsqueeze(1).astype(q.dtype)
        s = paddle.index_select(sin, positions).unsqueeze(1).astype(q.dtype)
        return _rotate(q, c, s), _rotate(k, c, s)

    def silu_and_mul(self, x: Tensor) -> Tensor:
        gate, up = paddle.chunk(x, 2, axis=-1)
        return F.silu(gate) * up

    # --- paged KV cache and attention -------------------------------------
    def allocate_kv_cache(
        self, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: str
    ) -> PagedKV:
        shape = [num_blocks * block_size, num_kv_heads, head_dim]
        return PagedKV(paddle.zeros(shape, _DTYPES[dtype]), paddle.zeros(shape, _DTYPES[dtype]), block_size)

    def write_kv_cache_(self, cache: PagedKV, k: Tensor, v: Tensor, slot_mapping: Tensor) -> None:
        paddle.scatter_(cache.k, slot_mapping, k.astype(cache.k.dtype), overwrite=True)
        paddle.scatter_(cache.v, slot_mapping, v.astype(cache.v.dtype), overwrite=True)

    def attention_plan(self, meta: AttentionMetadata) -> _Plan:
        return _build_plan(meta)

    def paged_attention(self, q: Tensor, cache: PagedKV, plan: _Plan, scale: float) -> Tensor:
        outs = [_attend_group(q, cache, g, scale) for g in plan.groups]
        out = outs[0] if len(outs) == 1 else paddle.concat(outs, axis=0)
        return out if plan.out_index is None else paddle.index_select(out, plan.out_index)

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


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    x1, x2 = paddle.chunk(x, 2, axis=-1)
    return paddle.concat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def _build_plan(meta: AttentionMetadata) -> _Plan:
    """Splits the step's rows into decodes (one query) and the rest.

    Each group is padded to its longest query and longest context: decodes
    then batch into one matmul whatever their lengths, and a long prefill
    does not pad every decode row to its length. Index tensors are built on
    the host from the host mirrors (cheap numpy), masks on the device.
    """
    qlens, seqlens, bs = meta.query_lens_host, meta.seq_lens_host, meta.block_size
    starts = np.zeros(len(qlens), dtype=np.int64)
    np.cumsum(qlens[:-1], out=starts[1:])
    groups: list[_Group] = []
    out_index = np.empty(meta.num_tokens, dtype=np.int64)
    offset = 0
    for rows in (np.flatnonzero(qlens == 1), np.flatnonzero(qlens > 1)):
        if len(rows) == 0:
            continue
        qlen = int(qlens[rows].max())
        nblocks = -(-int(seqlens[rows].max()) // bs)
        j = np.arange(qlen, dtype=np.int64)
        valid = j[None, :] < qlens[rows][:, None]
        tok = starts[rows][:, None] + np.where(valid, j[None, :], 0)  # pad with the row's first token
        flat_pos = offset + np.arange(len(rows) * qlen, dtype=np.int64).reshape(len(rows), qlen)
        out_index[tok[valid]] = flat_pos[valid]
        offset += len(rows) * qlen
        groups.append(_device_group(meta, rows, tok.reshape(-1), qlen, nblocks * bs))
    identity = len(groups) == 1 and offset == meta.num_tokens and bool(
        (out_index == np.arange(meta.num_tokens)).all())
    return _Plan(groups, None if identity else paddle.to_tensor(out_index))


def _device_group(meta: AttentionMetadata, rows: np.ndarray, tok: np.ndarray, qlen: int, kvlen: int) -> _Group:
    bs = meta.block_size
    n = len(rows)
    tok_idx = paddle.to_tensor(tok)
    rows_t = paddle.to_tensor(rows.astype(np.int64))
    blocks = paddle.index_select(meta.block_tables, rows_t)[:, : kvlen // bs]  # [n, nb]
    kv_slots = (blocks.unsqueeze(-1) * bs + paddle.arange(bs, dtype=paddle.int64)).reshape([n * kvlen])
    qpos = paddle.index_select(meta.positions, tok_idx).reshape([n, qlen, 1])
    kpos = paddle.arange(kvlen, dtype=paddle.int64).reshape([1, 1, kvlen])
    bias = paddle.where(kpos <= qpos, 0.0, _MASKED).astype(paddle.float32)
    return _Group(n, qlen, kvlen, tok_idx, kv_slots, bias.reshape([n, 1, qlen, 1, kvlen]))


def _attend_group(q: Tensor, cache: PagedKV, g: _Group, scale: float) -> Tensor:
    heads, dim = q.shape[1], q.shape[2]
    kv_heads = cache.k.shape[1]
    grp = heads // kv_heads
    # queries of one kv head side by side: [n, Hk, qlen * G, D]
    qg = paddle.index_select(q, g.tok_idx).astype(paddle.float32)
    qg = qg.reshape([g.rows, g.qlen, kv_heads, grp, dim]).transpose([0, 2, 1, 3, 4])
    qg = qg.reshape([g.rows, kv_heads, g.qlen * grp, dim])
    k = paddle.index_select(cache.k, g.kv_slots).astype(paddle.float32)
    v = paddle.index_select(cache.v, g.kv_slots).astype(paddle.float32)
    k = k.reshape([g.rows, g.kvlen, kv_heads, dim]).transpose([0, 2, 1, 3])
    v = v.reshape([g.rows, g.kvlen, kv_heads, dim]).transpose([0, 2, 1, 3])
    scores = paddle.matmul(qg, k, transpose_y=True) * scale
    scores = scores.reshape([g.rows, kv_heads, g.qlen, grp, g.kvlen]) + g.bias
    probs = F.softmax(scores, axis=-1).reshape([g.rows, kv_heads, g.qlen * grp, g.kvlen])
    out = paddle.matmul(probs, v).reshape([g.rows, kv_heads, g.qlen, grp, dim])
    out = out.transpose([0, 2, 1, 3, 4]).reshape([g.rows * g.qlen, heads * dim])
    return out.astype(q.dtype)
