"""Fused Triton kernels for the Torch runtime's decode path on a GPU.

Why: at batch 1 a Llama decode step is a few hundred small kernels, and once
CUDA graphs removed the launch gaps, those kernels (norms, casts, RoPE, KV
gathers, masks) cost more device time than reading the weights. Each kernel
here replaces a chain of framework ops with one pass over the data:

- `add_rms_norm`: residual add + RMSNorm (+ weight), the residual updated in place;
- `rope_and_cache_kv`: RoPE on q and k, k and v stored at their cache slots,
  q returned (one program per token, all heads);
- `silu_and_mul`: SwiGLU's activation in one pass;
- `argmax_rows`: greedy sampling's argmax over the vocabulary, split over blocks;
- `paged_decode_attention`: one query token per row against the row's keys
  read in place from the paged cache through its block table (flash-decoding:
  the context is split into partitions when rows x kv heads are too few to
  fill the GPU, then one small kernel merges the partitions).

Rounding follows the framework ops they replace (the sum is rounded to the
activations' dtype before it is normalized, as `h + x` then `rms_norm` did),
so fused and unfused steps differ only by float32 summation order.

Imported only where Triton is installed; the same kernels run on the CPU
under `TRITON_INTERPRET=1`, which is how the CPU test suite checks them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

# --------------------------------------------------------------------------- RMSNorm


@triton.jit
def _add_rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, n_cols, stride_x, stride_res, stride_out, eps,
                         HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RES:
        r = tl.load(res_ptr + row * stride_res + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(res_ptr.dtype.element_ty)
        tl.store(res_ptr + row * stride_res + cols, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / n_cols + eps)
    normed = (xf * rstd).to(out_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, (normed * w).to(out_ptr.dtype.element_ty), mask=mask)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual) * weight, x + residual); `residual` is overwritten
    with the sum. Without a residual, x itself becomes the residual."""
    rows, n = x.shape
    out = torch.empty_like(x)
    block = triton.next_power_of_2(n)
    res = residual if residual is not None else x
    _add_rms_norm_kernel[(rows,)](x, res, weight, out, n, x.stride(0), res.stride(0), out.stride(0), eps,
                                  HAS_RES=residual is not None, BLOCK=block, num_warps=_warps(block))
    return out, res


# --------------------------------------------------------------------------- RoPE + KV write


@triton.jit
def _rope_cache_kv_kernel(qkv_ptr, pos_ptr, cos_ptr, sin_ptr, slot_ptr, q_out_ptr, k_cache_ptr, v_cache_ptr,
                          stride_qkv_t, stride_qkv_h, stride_cs, stride_qo_t, stride_qo_h,
                          stride_c_slot, stride_c_h,
                          HQ: tl.constexpr, HK: tl.constexpr, D: tl.constexpr, BLOCK_H: tl.constexpr,
                          PDL: tl.constexpr):
    if PDL:  # launched early by the product before it (kernels/triton_gemv.py): wait for its qkv
        gdc_launch_dependents()
        gdc_wait()
    t = tl.program_id(0).to(tl.int64)
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, D)[None, :]
    rot = h < HQ + HK  # q and k heads are rotated, v heads are copied
    pos = tl.load(pos_ptr + t)
    # the tables fold rotate-half's sign into sin: x * cos + x[(d + D/2) % D] * sin
    cos = tl.load(cos_ptr + pos * stride_cs + d)
    sin = tl.load(sin_ptr + pos * stride_cs + d)
    base = qkv_ptr + t * stride_qkv_t + h * stride_qkv_h
    x = tl.load(base + d, mask=h < HQ + 2 * HK, other=0.0).to(tl.float32)
    partner = tl.load(base + (d + D // 2) % D, mask=rot, other=0.0).to(tl.float32)
    y = tl.where(rot, x * cos + partner * sin, x)
    tl.store(q_out_ptr + t * stride_qo_t + h * stride_qo_h + d, y.to(q_out_ptr.dtype.element_ty), mask=h < HQ)
    slot = tl.load(slot_ptr + t)
    kv_h = tl.where(h < HQ + HK, h - HQ, h - HQ - HK)
    at = slot * stride_c_slot + kv_h * stride_c_h + d
    is_k = (h >= HQ) & (h < HQ + HK)
    is_v = (h >= HQ + HK) & (h < HQ + 2 * HK)
    tl.store(k_cache_ptr + at, y.to(k_cache_ptr.dtype.element_ty), mask=is_k)
    tl.store(v_cache_ptr + at, y.to(v_cache_ptr.dtype.element_ty), mask=is_v)


def rope_and_cache_kv(qkv: torch.Tensor, num_q_heads: int, num_kv_heads: int, positions: torch.Tensor,
                      cos: torch.Tensor, sin: torch.Tensor, slot_mapping: torch.Tensor,
                      k_flat: torch.Tensor, v_flat: torch.Tensor, pdl: bool = False) -> torch.Tensor:
    """qkv [T, Hq + 2 Hk, D] -> rotated q [T, Hq, D]; rotated k and v go to
    k_flat / v_flat [slots, Hk, D] at `slot_mapping`. cos / sin: [max_pos, D]
    float32 tables with the sign of rotate-half folded into sin. `pdl`: launch
    with programmatic dependent launch (kernels/triton_gemv.py says why)."""
    t, heads, d = qkv.shape
    assert heads == num_q_heads + 2 * num_kv_heads and qkv.stride(2) == 1 and k_flat.stride(2) == 1
    q = torch.empty((t, num_q_heads, d), dtype=qkv.dtype, device=qkv.device)
    if t:
        _rope_cache_kv_kernel[(t,)](
            qkv, positions, cos, sin, slot_mapping, q, k_flat, v_flat,
            qkv.stride(0), qkv.stride(1), cos.stride(0), q.stride(0), q.stride(1),
            k_flat.stride(0), k_flat.stride(1),
            HQ=num_q_heads, HK=num_kv_heads, D=d, BLOCK_H=triton.next_power_of_2(heads), PDL=pdl, num_warps=4,
            launch_pdl=pdl)
    return q


# --------------------------------------------------------------------------- SwiGLU


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, n, stride_x, stride_out, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n
    g = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(x_ptr + row * stride_x + n + cols, mask=mask, other=0.0).to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, (act * u).to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    rows, two_n = x.shape
    n = two_n // 2
    out = torch.empty((rows, n), dtype=x.dtype, device=x.device)
    block = 1024
    if rows:
        _silu_and_mul_kernel[(rows, triton.cdiv(n, block))](x, out, n, x.stride(0), out.stride(0),
                                                             BLOCK=block, num_warps=4)
    return out


# --------------------------------------------------------------------------- greedy argmax


@triton.jit
def _argmax_blocks_kernel(x_ptr, val_ptr, idx_ptr, n, stride_x, num_blocks, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1)
    cols = b * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + row * stride_x + cols, mask=cols < n, other=float("-inf"))
    m, i = tl.max(x, axis=0, return_indices=True, return_indices_tie_break_left=True)
    tl.store(val_ptr + row * num_blocks + b, m)
    tl.store(idx_ptr + row * num_blocks + b, b * BLOCK + i)


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """torch.argmax(x, dim=1) for [R, V] float32 logits (the first index of the
    maximum), in two passes: a row of 128k logits is one block for torch's
    reduction (~27 us on an H100); split into blocks it is a few us."""
    rows, n = x.shape
    block = 4096
    nb = triton.cdiv(n, block)
    vals = torch.empty((rows, nb), dtype=torch.float32, device=x.device)
    idx = torch.empty((rows, nb), dtype=torch.int64, device=x.device)
    if rows:
        _argmax_blocks_kernel[(rows, nb)](x, vals, idx, n, x.stride(0), nb, BLOCK=block, num_warps=8)
    # the first block holding the maximum holds its first index
    return idx.gather(1, vals.argmax(dim=1, keepdim=True)).squeeze(1)


# --------------------------------------------------------------------------- decode attention


@triton.jit
def _decode_attention_kernel(q_ptr, k_ptr, v_ptr, tables_ptr, seq_lens_ptr, out_ptr, part_out_ptr, part_lse_ptr,
                             stride_q_t, stride_q_h, stride_tables, stride_k_blk, stride_k_tok, stride_k_h,
                             stride_o_t, scale, part_len, num_parts,
                             G: tl.constexpr, BLOCK_H: tl.constexpr, D: tl.constexpr, BS: tl.constexpr,
                             BLOCK_N: tl.constexpr, DIRECT: tl.constexpr, PRECISION: tl.constexpr,
                             PDL: tl.constexpr):
    # part_len and num_parts are run-time values: a new context length needs no new compile
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
    row = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1)
    part = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + row)
    start = part * part_len
    end = tl.minimum(start + part_len, seq_len)
    g = tl.arange(0, BLOCK_H)
    d = tl.arange(0, D)
    heads = kvh * G + g  # the query heads that share this kv head
    q = tl.load(q_ptr + row * stride_q_t + heads[:, None] * stride_q_h + d[None, :], mask=(g < G)[:, None],
                other=0.0)
    m = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, D], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        offs = n0 + tl.arange(0, BLOCK_N)
        valid = offs < end
        blk = tl.load(tables_ptr + row * stride_tables + offs // BS, mask=valid, other=0).to(tl.int64)
        at = blk * stride_k_blk + (offs % BS) * stride_k_tok + kvh * stride_k_h
        k = tl.load(k_ptr + at[:, None] + d[None, :], mask=valid[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m - m_new)
        l = l * alpha + tl.sum(p, axis=1)
        v = tl.load(v_ptr + at[:, None] + d[None, :], mask=valid[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m = m_new
    hmask = (g < G)[:, None]
    if DIRECT:
        o = acc / l[:, None]
        tl.store(out_ptr + row * stride_o_t + heads[:, None] * D + d[None, :], o.to(out_ptr.dtype.element_ty),
                 mask=hmask)
    else:
        # an empty partition (past this row's context) leaves weight 0 for the merge
        has = l > 0
        o = acc / tl.where(has, l, 1.0)[:, None]
        lse = tl.where(has, m + tl.log(tl.where(has, l, 1.0)), float("-inf"))
        at_part = (row * (G * tl.num_programs(1)) + heads) * num_parts + part
        tl.store(part_out_ptr + at_part[:, None] * D + d[None, :], o, mask=hmask)
        tl.store(part_lse_ptr + at_part, lse, mask=g < G)


@triton.jit
def _merge_partitions_kernel(part_out_ptr, part_lse_ptr, out_ptr, stride_o_t, num_heads, num_parts,
                             D: tl.constexpr, BLOCK_P: tl.constexpr, PDL: tl.constexpr):
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
    row = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    p = tl.arange(0, BLOCK_P)
    d = tl.arange(0, D)
    at = (row * num_heads + h) * num_parts + p
    lse = tl.load(part_lse_ptr + at, mask=p < num_parts, other=float("-inf"))
    w = tl.exp(lse - tl.max(lse, axis=0))
    w = w / tl.sum(w, axis=0)
    o = tl.load(part_out_ptr + at[:, None] * D + d[None, :], mask=(p < num_parts)[:, None], other=0.0)
    tl.store(out_ptr + row * stride_o_t + h * D + d, tl.sum(o * w[:, None], axis=0).to(out_ptr.dtype.element_ty))


BLOCK_N = 64  # keys per inner iteration


def decode_partitions(rows: int, kv_heads: int, max_context: int, target_programs: int) -> tuple[int, int]:
    """(tokens per partition, partitions): split the context only as far as
    needed to give the GPU about `target_programs` programs."""
    chunks = max(1, -(-max_context // BLOCK_N))
    want = max(1, -(-target_programs // max(1, rows * kv_heads)))
    parts = min(chunks, want)
    per = -(-chunks // parts) * BLOCK_N
    return per, -(-max_context // per)


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                           seq_lens: torch.Tensor, max_context: int, scale: float,
                           target_programs: int | None = None, pdl: bool = False) -> torch.Tensor:
    """q [R, Hq, D] (one token per row) against each row's first seq_lens[r]
    keys; caches [blocks, block_size, Hk, D]; block_tables [R, >= blocks per
    row]; `max_context` (a host fact, >= every seq_len) sizes the grid, so a
    captured graph replays correctly for any context up to it. -> [R, Hq * D]"""
    rows, hq, d = q.shape
    _, bs, hk, _ = k_cache.shape
    assert q.stride(2) == 1 and k_cache.stride() == v_cache.stride()
    g = hq // hk
    out = torch.empty((rows, hq * d), dtype=q.dtype, device=q.device)
    if rows == 0:
        return out
    if target_programs is None:
        target_programs = 2 * _sm_count(q.device)
    per, parts = decode_partitions(rows, hk, max_context, target_programs)
    direct = parts == 1
    if direct:
        part_out = part_lse = out  # unused
    else:
        part_out = torch.empty((rows, hq, parts, d), dtype=torch.float32, device=q.device)
        part_lse = torch.empty((rows, hq, parts), dtype=torch.float32, device=q.device)
    _decode_attention_kernel[(rows, hk, parts)](
        q, k_cache, v_cache, block_tables, seq_lens, out, part_out, part_lse,
        q.stride(0), q.stride(1), block_tables.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        out.stride(0), scale, per, parts,
        G=g, BLOCK_H=max(16, triton.next_power_of_2(g)), D=d, BS=bs, BLOCK_N=BLOCK_N, DIRECT=direct,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32", PDL=pdl, num_warps=4, launch_pdl=pdl)
    if not direct:
        _merge_partitions_kernel[(rows, hq)](part_out, part_lse, out, out.stride(0), hq, parts, D=d,
                                            BLOCK_P=triton.next_power_of_2(parts), PDL=pdl, num_warps=4,
                                            launch_pdl=pdl)
    return out


# --------------------------------------------------------------------------- helpers


def _warps(block: int) -> int:
    return max(1, min(16, block // 256))


_SMS: dict[int, int] = {}


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter on the CPU: small, so tests exercise the partitioned path
    i = device.index if device.index is not None else torch.cuda.current_device()
    if i not in _SMS:
        _SMS[i] = torch.cuda.get_device_properties(i).multi_processor_count
    return _SMS[i]


__all__ = ["add_rms_norm", "argmax_rows", "decode_partitions", "paged_decode_attention", "rope_and_cache_kv", "silu_and_mul"]
