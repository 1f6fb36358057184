"""The ops layer on Torch: the same model, sampler and runner on torch tensors.

Optional (torch is not a project dependency): `load_runtime("torch", device)`.
The paged attention here is plain tensor ops like the Paddle runtime's, so it
runs on the CPU for tests; on a GPU it is the correct but slow reference
that a FlashAttention-style kernel replaces. The KV cache uses the layout
such kernels take, [num_blocks, block_size, kv_heads, head_dim].

On CUDA nothing in a step may wait for the device: host-to-device copies go
through pinned memory with non_blocking=True (a pageable `copy_` or
`torch.tensor(..., device=cuda)` synchronizes the stream), and device-to-host
copies land in the `kernels` pool of page-locked buffers where it was built.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from overlapd.kernels import cuda_handoff

from .ops import INT64, AttentionMetadata, HostFuture, Tensor

_DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "int32": torch.int32,
    "int64": torch.int64,
    "bool": torch.bool,
}
_NAMES = {v: k for k, v in _DTYPES.items()}


# dtypes the native pinned pool hands back as numpy arrays (bfloat16 has none)
_NUMPY_DTYPES = {torch.float32: np.float32, torch.int64: np.int64, torch.int32: np.int32, torch.bool: np.bool_}


class _HostCopy:
    """A device-to-host copy: on CUDA into pinned memory, completed by an event
    (torch's pinned allocator; the native pool is preferred where it exists)."""

    def __init__(self, x: Tensor) -> None:
        if x.is_cuda:
            self._host = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
            self._host.copy_(x, non_blocking=True)
            self._event: torch.cuda.Event | None = torch.cuda.Event()
            self._event.record()
        else:
            # A copy, not an alias: a replayed graph rewrites its outputs in place.
            self._host, self._event = x.clone(), None

    def result(self) -> np.ndarray:
        if self._event is not None:
            self._event.synchronize()
        x = self._host if self._host.dtype != torch.bfloat16 else self._host.float()
        return x.numpy()


class _RopePlan:
    """A step's cos/sin rows, cast to the activations' dtype once per forward, not per layer."""

    __slots__ = ("cos", "sin", "_cast")

    def __init__(self, cos: Tensor, sin: Tensor) -> None:
        self.cos, self.sin = cos, sin
        self._cast: dict[torch.dtype, tuple[Tensor, Tensor]] = {}

    def cast(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        cs = self._cast.get(dtype)
        if cs is None:
            cs = self._cast[dtype] = (self.cos.to(dtype), self.sin.to(dtype))
        return cs

    def __getitem__(self, i: int) -> Tensor:  # (cos, sin) as the ops Protocol's plan tuple
        return (self.cos, self.sin)[i]


class _TorchGraph:
    """A captured CUDA graph and the tensors its capture returned (fixed addresses)."""

    def __init__(self, fn: Callable[[], object], pool: object) -> None:
        # Warm up on a side stream first: lazy initializations (cuBLAS
        # workspaces, allocator growth) must not happen inside the capture.
        # The run is real work with the step's real inputs; it writes what the
        # replay writes again (the step's KV entries, its sampled ids).
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: the loop thread may wait on events while we capture here.
        with torch.cuda.graph(self.graph, pool=pool, capture_error_mode="thread_local"):
            self.output = fn()

    def replay(self) -> None:
        self.graph.replay()


@dataclass(slots=True)
class PagedKV:
    k: Tensor  # [num_blocks, block_size, Hk, D]
    v: Tensor
    k_flat: Tensor  # [num_blocks * block_size, Hk, D] views for writes by slot
    v_flat: Tensor


@dataclass(slots=True)
class _Group:
    rows: int
    qlen: int
    kvlen: int
    tok_idx: Tensor | None
    kv_blocks: Tensor  # [rows * kvlen / block_size]
    bias: Tensor  # bool [rows, 1, qlen, 1, kvlen]: True where a query may attend


@dataclass(slots=True)
class _Plan:
    groups: list[_Group]
    out_index: Tensor | None
    slot_mapping: Tensor


class TorchOps:
    name = "torch"

    def __init__(self, device: str = "cpu") -> None:
        if device not in ("cpu", "gpu"):
            raise ValueError(f"device must be 'cpu' or 'gpu', got {device!r}")
        if device == "gpu" and not torch.cuda.is_available():
            raise RuntimeError("device='gpu' needs a CUDA build of torch and a visible GPU")
        self.device = device
        # Weights and inputs never require grad, so no autograd graph is built.
        self._dev = torch.device("cuda" if device == "gpu" else "cpu")
        self._cuda = self._dev.type == "cuda"
        # Landing buffers for step outputs: 8 x 1 MiB covers max_inflight steps'
        # ints and logprobs with room; a larger tensor takes torch's pinned path.
        self._pinned = cuda_handoff.PinnedCopies() if self._cuda and cuda_handoff.native() is not None else None

    def _to_device(self, a: np.ndarray) -> Tensor:
        """A new device tensor from host data without synchronizing the stream:
        the pinned copy is freed for reuse only once the transfer ran (torch's
        caching host allocator records an event on the stream)."""
        t = torch.from_numpy(np.ascontiguousarray(a))
        if not self._cuda:
            return t.clone()  # staging arrays get reused
        return t.pin_memory().to(self._dev, non_blocking=True)

    # --- creation and host transfer -------------------------------------
    def empty(self, shape: Sequence[int], dtype: str) -> Tensor:
        return torch.empty(list(shape), dtype=_DTYPES[dtype], device=self._dev)

    def zeros(self, shape: Sequence[int], dtype: str) -> Tensor:
        return torch.zeros(list(shape), dtype=_DTYPES[dtype], device=self._dev)

    def full(self, shape: Sequence[int], value: float | int, dtype: str) -> Tensor:
        return torch.full(list(shape), value, dtype=_DTYPES[dtype], device=self._dev)

    def arange(self, n: int, dtype: str = INT64) -> Tensor:
        return torch.arange(n, dtype=_DTYPES[dtype], device=self._dev)

    def from_numpy(self, a: np.ndarray, dtype: str | None = None) -> Tensor:
        # Load time only (weights, tables): a plain synchronous copy, so a 1 GB
        # weight never lands in the pinned cache.
        x = torch.tensor(np.ascontiguousarray(a), device=self._dev)
        return x if dtype is None else x.to(_DTYPES[dtype])

    def to_numpy(self, x: Tensor) -> np.ndarray:
        x = x.detach()
        return (x.float() if x.dtype == torch.bfloat16 else x).cpu().numpy()

    def to_host_async(self, x: Tensor) -> HostFuture:
        nbytes = x.numel() * x.element_size()
        if self._pinned is not None and x.dtype in _NUMPY_DTYPES and self._pinned.fits(nbytes) \
                and self._pinned.available:
            x = x.contiguous()
            return self._pinned.copy_async(x.data_ptr(), nbytes, _NUMPY_DTYPES[x.dtype], tuple(x.shape),
                                           self.current_stream_handle())
        return _HostCopy(x)

    def copy_from_host_(self, dst: Tensor, src: np.ndarray) -> None:
        if len(src):
            t = torch.from_numpy(np.ascontiguousarray(src)).to(dst.dtype)
            if self._cuda:
                t = t.pin_memory()  # pageable copy_ would synchronize the stream
            dst[: len(src)].copy_(t, non_blocking=self._cuda)

    def copy_(self, dst: Tensor, src: Tensor) -> None:
        if src.shape[0]:
            dst[: src.shape[0]].copy_(src)

    def data_ptr(self, x: Tensor) -> int:
        return int(x.data_ptr())

    def dtype_of(self, x: Tensor) -> str:
        return _NAMES[x.dtype]

    def cast(self, x: Tensor, dtype: str) -> Tensor:
        return x.to(_DTYPES[dtype])

    # --- shape ------------------------------------------------------------
    def reshape(self, x: Tensor, shape: Sequence[int]) -> Tensor:
        return x.reshape(list(shape))

    def split(self, x: Tensor, sizes: Sequence[int], axis: int = -1) -> list[Tensor]:
        return list(torch.split(x, list(sizes), dim=axis))

    def concat(self, xs: Sequence[Tensor], axis: int = 0) -> Tensor:
        return torch.cat(list(xs), dim=axis)

    def unsqueeze(self, x: Tensor, axis: int) -> Tensor:
        return x.unsqueeze(axis)

    # --- indexing -----------------------------------------------------------
    def index_select(self, x: Tensor, index: Tensor, axis: int = 0) -> Tensor:
        return torch.index_select(x, axis, index)

    def gather(self, x: Tensor, index: Tensor, axis: int) -> Tensor:
        return torch.gather(x, axis, index)

    def scatter_rows_(self, dst: Tensor, index: Tensor, src: Tensor) -> None:
        dst.index_copy_(0, index, src.to(dst.dtype))

    def searchsorted(self, sorted_seq: Tensor, values: Tensor, right: bool = False) -> Tensor:
        return torch.searchsorted(sorted_seq.contiguous(), values, right=right)

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
        return torch.div(a, b, rounding_mode="floor")

    def remainder(self, a: Tensor, b: Tensor | int) -> Tensor:
        return torch.remainder(a, b)

    def bitwise_xor(self, a: Tensor, b: Tensor) -> Tensor:
        return torch.bitwise_xor(a, b)

    def maximum(self, a: Tensor, b: Tensor | float | int) -> Tensor:
        return torch.maximum(a, b) if isinstance(b, torch.Tensor) else torch.clamp(a, min=b)

    def minimum(self, a: Tensor, b: Tensor | float | int) -> Tensor:
        return torch.minimum(a, b) if isinstance(b, torch.Tensor) else torch.clamp(a, max=b)

    def where(self, cond: Tensor, a: Tensor | float | int, b: Tensor | float | int) -> Tensor:
        return torch.where(cond, a, b)

    def lt(self, a: Tensor, b: Tensor | float | int) -> Tensor:
        return a < b

    def le(self, a: Tensor, b: Tensor | float | int) -> Tensor:
        return a <= b

    def gt(self, a: Tensor, b: Tensor | float | int) -> Tensor:
        return a > b

    def ge(self, a: Tensor, b: Tensor | float | int) -> Tensor:
        return a >= b

    def logical_and(self, a: Tensor, b: Tensor) -> Tensor:
        return torch.logical_and(a, b)

    # --- reductions and sorting ---------------------------------------------
    def sum(self, x: Tensor, axis: int, keepdim: bool = False, dtype: str | None = None) -> Tensor:
        return torch.sum(x, dim=axis, keepdim=keepdim, dtype=None if dtype is None else _DTYPES[dtype])

    def cumsum(self, x: Tensor, axis: int) -> Tensor:
        return torch.cumsum(x, dim=axis)

    def argmax(self, x: Tensor, axis: int) -> Tensor:
        return torch.argmax(x, dim=axis)

    def topk(self, x: Tensor, k: int) -> tuple[Tensor, Tensor]:
        values, indices = torch.topk(x, k, dim=-1, largest=True, sorted=True)
        return values, indices

    def argsort_descending(self, x: Tensor) -> Tensor:
        return torch.sort(x, dim=-1, descending=True, stable=True).indices

    def softmax(self, x: Tensor, axis: int = -1) -> Tensor:
        return torch.softmax(x, dim=axis)

    def log_softmax(self, x: Tensor, axis: int = -1) -> Tensor:
        return torch.log_softmax(x, dim=axis)

    # --- model building blocks ----------------------------------------------
    def embedding(self, ids: Tensor, weight: Tensor) -> Tensor:
        return F.embedding(ids, weight)

    def linear(self, x: Tensor, weight: Tensor) -> Tensor:
        return F.linear(x, weight)

    def rms_norm(self, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        # F.rms_norm is one fused kernel on CUDA (five without it); float32 inside.
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=eps)
        return normed.to(x.dtype) * weight

    def rope_tables(self, cos: np.ndarray, sin: np.ndarray) -> tuple[Tensor, Tensor]:
        c = np.concatenate([cos, cos], axis=-1)
        s = np.concatenate([-sin, sin], axis=-1)  # rotate-half's sign folded in
        return self._to_device(c), self._to_device(s)

    def rope_plan(self, positions: Tensor, tables: tuple[Tensor, Tensor]) -> "_RopePlan":
        return _RopePlan(tables[0][positions].unsqueeze(1), tables[1][positions].unsqueeze(1))

    def rotary_embedding(self, x: Tensor, plan: "_RopePlan") -> Tensor:
        c, s = plan.cast(x.dtype)
        return torch.addcmul(x * c, torch.roll(x, x.shape[-1] // 2, dims=-1), s)

    def silu_and_mul(self, x: Tensor) -> Tensor:
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up

    # --- paged KV cache and attention -------------------------------------
    def allocate_kv_cache(
        self, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: str
    ) -> PagedKV:
        shape = [num_blocks, block_size, num_kv_heads, head_dim]
        k = torch.zeros(shape, dtype=_DTYPES[dtype], device=self._dev)
        v = torch.zeros(shape, dtype=_DTYPES[dtype], device=self._dev)
        return PagedKV(k, v, k.view(-1, num_kv_heads, head_dim), v.view(-1, num_kv_heads, head_dim))

    def attention_plan(self, meta: AttentionMetadata, cache: PagedKV) -> _Plan:
        return _build_plan(meta, self._dev, self._to_device)

    def write_kv_cache_(self, cache: PagedKV, k: Tensor, v: Tensor, plan: _Plan) -> None:
        cache.k_flat.index_copy_(0, plan.slot_mapping, k.to(cache.k.dtype))
        cache.v_flat.index_copy_(0, plan.slot_mapping, v.to(cache.v.dtype))

    def paged_attention(self, q: Tensor, cache: PagedKV, plan: _Plan, scale: float) -> Tensor:
        outs = [_attend_group(q, cache, g, scale) for g in plan.groups]
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)
        return out if plan.out_index is None else out.index_select(0, plan.out_index)

    # --- CUDA graphs ------------------------------------------------------------
    def capture_graph(self, fn: Callable[[], object]) -> "_TorchGraph":
        """Capture `fn`'s kernels once (stages/decode_graphs.py decides when)."""
        if not self._cuda:
            raise RuntimeError("CUDA graphs need device='gpu'")
        if self._graph_pool is None:
            self._graph_pool = torch.cuda.graph_pool_handle()  # one pool: graphs replay one at a time
        return _TorchGraph(fn, self._graph_pool)

    _graph_pool = None

    # --- device ---------------------------------------------------------------
    def synchronize(self) -> None:
        if self.device == "gpu":
            torch.cuda.synchronize()

    def current_stream_handle(self) -> int:
        return int(torch.cuda.current_stream().cuda_stream) if self.device == "gpu" else 0


def _build_plan(meta: AttentionMetadata, dev: torch.device, to_dev: Callable[[np.ndarray], Tensor]) -> _Plan:
    """Decode rows and the rest, each padded to its longest query and context
    (the same grouping as the Paddle runtime's; see paddle_attention.py).

    When the decode rows are the step's first rows (the scheduler puts running
    requests first), their query positions and block tables come from the
    device tensors alone: nothing is uploaded, so a decode step can be
    captured in a CUDA graph and replayed with new contents."""
    qlens, seqlens, bs = meta.query_lens_host, meta.seq_lens_host, meta.block_size
    starts = np.concatenate([[0], np.cumsum(qlens)[:-1]]).astype(np.int64)
    out_index = np.empty(meta.num_tokens, dtype=np.int64)
    groups, offset = [], 0
    for rows in (np.flatnonzero(qlens == 1), np.flatnonzero(qlens > 1)):
        if len(rows) == 0:
            continue
        n, qlen = len(rows), int(qlens[rows].max())
        nblocks = -(-int(seqlens[rows].max()) // bs)
        j = np.arange(qlen, dtype=np.int64)
        valid = j[None, :] < qlens[rows][:, None]
        tok = starts[rows][:, None] + np.where(valid, j[None, :], 0)
        if qlen == 1 and rows[-1] == n - 1:  # decode rows 0..n-1
            qpos = (meta.seq_lens[:n] - 1).unsqueeze(1)
            tables = meta.block_tables[:n, :nblocks]
        else:
            qpos = to_dev((seqlens[rows] - qlens[rows])[:, None] + j[None, :])
            tables = meta.block_tables.index_select(0, to_dev(rows.astype(np.int64)))[:, :nblocks]
        out_index[tok[valid]] = offset + np.flatnonzero(valid.reshape(-1))
        offset += n * qlen
        kpos = torch.arange(nblocks * bs, device=dev)
        mask = kpos[None, None, :] <= qpos[:, :, None]  # causal over the row's own keys
        tok_t = None if n * qlen == meta.num_tokens and (tok.reshape(-1) == np.arange(meta.num_tokens)).all() \
            else to_dev(tok.reshape(-1))
        groups.append(_Group(n, qlen, nblocks * bs, tok_t, tables.reshape(-1), mask.view(n, 1, qlen, 1, -1)))
    identity = len(groups) == 1 and groups[0].tok_idx is None
    return _Plan(groups, None if identity else to_dev(out_index), meta.slot_mapping)


def _attend_group(q: Tensor, cache: PagedKV, g: _Group, scale: float) -> Tensor:
    """One fused attention call (torch SDPA) per group. Grouped-query heads fold
    into the query axis ([n, Hk, qlen * grp, D] against [n, Hk, kvlen, D]), so
    the kernel sees plain multi-head attention with a boolean mask and no
    repeated keys."""
    heads, dim = q.shape[1], q.shape[2]
    kv_heads = cache.k.shape[2]
    grp = heads // kv_heads
    n, qlen, kvlen = g.rows, g.qlen, g.kvlen
    qg = (q if g.tok_idx is None else q.index_select(0, g.tok_idx)).to(cache.k.dtype)
    qg = qg.view(n, qlen, kv_heads, grp, dim).permute(0, 2, 1, 3, 4).reshape(n, kv_heads, qlen * grp, dim)
    k = cache.k.index_select(0, g.kv_blocks).view(n, kvlen, kv_heads, dim).transpose(1, 2)
    v = cache.v.index_select(0, g.kv_blocks).view(n, kvlen, kv_heads, dim).transpose(1, 2)
    mask = g.bias.expand(n, 1, qlen, grp, kvlen).reshape(n, 1, qlen * grp, kvlen)
    out = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask, scale=scale)
    out = out.view(n, kv_heads, qlen, grp, dim).permute(0, 2, 1, 3, 4)
    return out.reshape(n * qlen, heads * dim).to(q.dtype)


__all__ = ["PagedKV", "TorchOps"]
