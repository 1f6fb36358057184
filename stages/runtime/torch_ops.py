"""The ops layer on Torch: the same model, sampler and runner on torch tensors.

Optional (torch is not a project dependency): `load_runtime("torch", device)`.
On the CPU every op is a plain tensor op (the tests' path). On a GPU with
Triton, the decode path's fused kernels (kernels/triton_decode.py) replace
the norm, RoPE + KV write, SwiGLU and paged decode attention op chains;
OVERLAPD_FUSED=0 turns them off. The KV cache layout and attention plans are
in torch_attention.py.

On CUDA nothing in a step may wait for the device: host-to-device copies go
through pinned memory with non_blocking=True (a pageable `copy_` or
`torch.tensor(..., device=cuda)` synchronizes the stream), and device-to-host
copies land in the `kernels` pool of page-locked buffers where it was built.
"""

from __future__ import annotations

import importlib
import os
import weakref
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from overlapd.kernels import cuda_handoff

from . import composed
from .ops import INT64, AttentionMetadata, HostFuture, Tensor
from .torch_attention import PagedKV, AttentionGroup, AttentionPlan, attend_group, build_plan
from .torch_collectives import TorchCollectives
from .torch_device import HostCopy, TorchGraph
from .torch_fused import FusedProducts, fused_entry, fused_kernels

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


class _RopePlan:
    """A step's positions and the RoPE tables. The fused kernel reads the table
    rows itself; the op path gathers them once per forward (not per layer) and
    casts them to the activations' dtype once."""

    __slots__ = ("positions", "tables", "_rows", "_cast")

    def __init__(self, positions: Tensor, tables: tuple[Tensor, Tensor]) -> None:
        self.positions, self.tables = positions, tables
        self._rows: tuple[Tensor, Tensor] | None = None
        self._cast: dict[torch.dtype, tuple[Tensor, Tensor]] = {}

    def rows(self) -> tuple[Tensor, Tensor]:
        if self._rows is None:
            self._rows = (self.tables[0][self.positions].unsqueeze(1), self.tables[1][self.positions].unsqueeze(1))
        return self._rows

    def cast(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        cs = self._cast.get(dtype)
        if cs is None:
            cos, sin = self.rows()
            cs = self._cast[dtype] = (cos.to(dtype), sin.to(dtype))
        return cs

    def __getitem__(self, i: int) -> Tensor:  # (cos, sin) as the ops Protocol's plan tuple
        return self.rows()[i]


class TorchOps(TorchCollectives):
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
        # torch.cuda.current_stream() checks the driver's device count on every
        # call (~40 us on an H200 host); the step asks for the stream twice a step
        self._device_index = torch.cuda.current_device() if self._cuda else -1
        # Landing buffers for step outputs: 8 x 1 MiB covers max_inflight steps'
        # ints and logprobs with room; a larger tensor takes torch's pinned path.
        self._pinned = cuda_handoff.PinnedCopies() if self._cuda and cuda_handoff.native() is not None else None
        self._fused = fused_kernels(self._cuda)
        # sort-free seeded sampling (kernels/triton_sampling.py), with the decode kernels
        self.fused_sample = fused_entry(self._fused, "triton_sampling", "sample")
        # logprob outputs without a log_softmax tensor, a decode step's attention metadata in one launch
        self.fused_logprobs = fused_entry(self._fused, "triton_logprobs", "pack")
        self.fused_decode_metadata = fused_entry(self._fused, "triton_metadata", "decode_metadata")
        # One-token steps through kernels/triton_gemv.py's products with the norms, SwiGLU and residual
        # adds fused in (LlamaModel.forward); OVERLAPD_GEMV=0 keeps cuBLAS. The kernels of that chain
        # (RoPE and attention of one-token steps too) launch with programmatic dependent launch where the
        # GPU has it (OVERLAPD_PDL=0: never).
        gemv = importlib.import_module("overlapd.kernels.triton_gemv") if self._fused is not None else None
        self._pdl = gemv is not None and gemv.pdl_supported(self._dev)
        self.fused_products = FusedProducts(gemv, self._pdl) \
            if gemv is not None and os.environ.get("OVERLAPD_GEMV", "1") != "0" else None

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

    def random_normal(self, shape: Sequence[int], seed: int, mean: float = 0.0, std: float = 1.0) -> Tensor:
        """float32 normal draws made on the device by a generator seeded with `seed`
        (dummy weights: no host round trip)."""
        g = torch.Generator(device=self._dev)
        g.manual_seed(seed & 0x7FFFFFFFFFFFFFFF)
        x = torch.randn(list(shape), generator=g, dtype=torch.float32, device=self._dev)
        return x.mul_(std).add_(mean) if (mean, std) != (0.0, 1.0) else x

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
        return HostCopy(x)

    def host_zeros(self, shape: Sequence[int], dtype: str) -> np.ndarray:
        if not self._cuda:
            return np.zeros(list(shape), dtype)
        return torch.zeros(list(shape), dtype=_DTYPES[dtype], pin_memory=True).numpy()  # the array keeps it alive

    def copy_from_host_(self, dst: Tensor, src: np.ndarray) -> None:
        if len(src):
            t = torch.from_numpy(np.ascontiguousarray(src)).to(dst.dtype)
            if self._cuda and not t.is_pinned():
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
        if self._fused is not None and x.dim() == 2 and axis in (1, -1) and x.dtype == torch.float32 \
                and x.shape[1] >= 8192:
            return self._fused.argmax_rows(x)
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
        if self._fused is not None and x.dim() == 2:
            return self._fused.add_rms_norm(x, None, weight, eps)[0]
        # F.rms_norm is one fused kernel on CUDA (five without it); float32 inside.
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=eps)
        return normed.to(x.dtype) * weight

    def add_rms_norm(self, x: Tensor, residual: Tensor | None, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
        if self._fused is not None:
            return self._fused.add_rms_norm(x, residual, weight, eps)
        return composed.add_rms_norm(self, x, residual, weight, eps)

    def rope_and_cache_kv(self, qkv: Tensor, num_q_heads: int, num_kv_heads: int, rope: "_RopePlan",
                          cache: "PagedKV", plan: "AttentionPlan") -> Tensor:
        if self._fused is not None:
            cos, sin = rope.tables
            return self._fused.rope_and_cache_kv(qkv, num_q_heads, num_kv_heads, rope.positions, cos, sin,
                                                 plan.slot_mapping, cache.k_flat, cache.v_flat,
                                                 pdl=self._pdl and qkv.shape[0] == 1)
        return composed.rope_and_cache_kv(self, qkv, num_q_heads, num_kv_heads, rope, cache, plan)

    def rope_tables(self, cos: np.ndarray, sin: np.ndarray) -> tuple[Tensor, Tensor]:
        c = np.concatenate([cos, cos], axis=-1)
        s = np.concatenate([-sin, sin], axis=-1)  # rotate-half's sign folded in
        return self._to_device(c), self._to_device(s)

    def rope_plan(self, positions: Tensor, tables: tuple[Tensor, Tensor]) -> "_RopePlan":
        return _RopePlan(positions, tables)

    def rotary_embedding(self, x: Tensor, plan: "_RopePlan") -> Tensor:
        c, s = plan.cast(x.dtype)
        return torch.addcmul(x * c, torch.roll(x, x.shape[-1] // 2, dims=-1), s)

    def silu_and_mul(self, x: Tensor) -> Tensor:
        if self._fused is not None and x.dim() == 2:
            return self._fused.silu_and_mul(x)
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

    def attention_plan(self, meta: AttentionMetadata, cache: PagedKV) -> AttentionPlan:
        return build_plan(meta, self._dev, self._to_device, fused_decode=self._fused is not None)

    def write_kv_cache_(self, cache: PagedKV, k: Tensor, v: Tensor, plan: AttentionPlan) -> None:
        cache.k_flat.index_copy_(0, plan.slot_mapping, k.to(cache.k.dtype))
        cache.v_flat.index_copy_(0, plan.slot_mapping, v.to(cache.v.dtype))

    def paged_attention(self, q: Tensor, cache: PagedKV, plan: AttentionPlan, scale: float) -> Tensor:
        outs = [attend_group(q, cache, g, scale) if g.tables is None else self._decode_group(q, cache, g, scale)
                for g in plan.groups]
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)
        return out if plan.out_index is None else out.index_select(0, plan.out_index)

    def _decode_group(self, q: Tensor, cache: PagedKV, g: AttentionGroup, scale: float) -> Tensor:
        assert self._fused is not None and g.tables is not None and g.seq_lens is not None
        qg = q if g.tok_idx is None else q.index_select(0, g.tok_idx)
        return self._fused.paged_decode_attention(qg, cache.k, cache.v, g.tables, g.seq_lens, g.kvlen, scale,
                                                  pdl=self._pdl and qg.shape[0] == 1)

    # --- CUDA graphs ------------------------------------------------------------
    def capture_graph(self, fn: Callable[[], object]) -> TorchGraph:
        """Capture `fn`'s kernels once (stages/runner/decode_graphs.py decides when)."""
        if not self._cuda:
            raise RuntimeError("CUDA graphs need device='gpu'")
        # One pool for all graphs (they replay one at a time), but only while one
        # of them lives: torch's allocator refuses to capture into a pool whose
        # graphs were all freed (a runner dropped while this ops object lives on).
        if self._live_graphs == 0:
            self._graph_pool = torch.cuda.graph_pool_handle()
        g = TorchGraph(fn, self._graph_pool)
        self._live_graphs += 1
        weakref.finalize(g, self._graph_freed)
        return g

    def _graph_freed(self) -> None:
        self._live_graphs -= 1

    _graph_pool = None
    _live_graphs = 0

    # --- device ---------------------------------------------------------------
    def synchronize(self) -> None:
        if self.device == "gpu":
            torch.cuda.synchronize()

    def current_stream_handle(self) -> int:
        # the raw current stream (a capture's stream while a graph is captured)
        return torch._C._cuda_getCurrentRawStream(self._device_index) if self._cuda else 0


__all__ = ["PagedKV", "TorchOps"]
