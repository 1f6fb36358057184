"""The fused decode kernels (kernels/triton_decode.py) on the device, bfloat16 and float32,
against a float64 reference and against the op path they replace (OVERLAPD_FUSED=0)."""

from __future__ import annotations

import numpy as np
import pytest
from gpu_support import requires_gpu

pytestmark = requires_gpu


@pytest.fixture(scope="module")
def fused(torch):
    from overlapd.stages.runtime.torch_ops import TorchOps

    ops = TorchOps("gpu")
    if ops._fused is None:
        pytest.fail("Triton is missing on the GPU host: the fused decode kernels did not load")
    return ops


@pytest.fixture(scope="module")
def plain(torch):
    from overlapd.stages.runtime.torch_ops import TorchOps

    mp = pytest.MonkeyPatch()
    mp.setenv("OVERLAPD_FUSED", "0")
    ops = TorchOps("gpu")
    mp.undo()
    assert ops._fused is None
    return ops


def _rel(a, b) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    assert bool(a.isfinite().all())
    return float((a - b).norm() / b.norm())


def _decode_step(torch, ops, dtype: str, seq_lens: list[int], hq=32, hk=8, dim=64, bs=16, seed=0):
    from overlapd.stages.runtime.ops import AttentionMetadata

    g = torch.Generator(device="cpu").manual_seed(seed)
    rows = len(seq_lens)
    max_blocks = -(-max(seq_lens) // bs)
    num_blocks = rows * max_blocks + 3
    cache = ops.allocate_kv_cache(num_blocks, bs, hk, dim, dtype)
    cache.k.copy_(torch.randn(cache.k.shape, generator=g).to(cache.k.dtype))
    cache.v.copy_(torch.randn(cache.v.shape, generator=g).to(cache.v.dtype))
    tables = torch.randperm(num_blocks, generator=g)[: rows * max_blocks].reshape(rows, max_blocks)
    seq = np.array(seq_lens, np.int64)
    pos = seq - 1
    slots = tables[torch.arange(rows), torch.from_numpy(pos // bs)] * bs + torch.from_numpy(pos % bs)
    meta = AttentionMetadata(
        num_tokens=rows, num_rows=rows, block_size=bs, positions=ops.from_numpy(pos),
        token_rows=ops.from_numpy(np.arange(rows)), query_start_loc=ops.from_numpy(np.arange(rows + 1)),
        seq_lens=ops.from_numpy(seq), block_tables=tables.cuda(), slot_mapping=slots.cuda(),
        query_lens_host=np.ones(rows, np.int64), seq_lens_host=seq)
    q = torch.randn(rows, hq, dim, generator=g).to(cache.k.dtype).cuda()
    return meta, cache, q, tables, seq


def _reference(torch, q, cache, tables, seq, scale):
    rows, hq, dim = q.shape
    bs, hk = cache.k.shape[1], cache.k.shape[2]
    out = torch.empty(rows, hq * dim, dtype=torch.float64)
    k_all, v_all = cache.k.double().cpu(), cache.v.double().cpu()
    for r in range(rows):
        p = torch.arange(int(seq[r]))
        b = tables[r][p // bs]
        k, v = k_all[b, p % bs], v_all[b, p % bs]
        for h in range(hq):
            w = torch.softmax(k[:, h // (hq // hk)] @ q[r, h].double().cpu() * scale, 0)
            out[r, h * dim:(h + 1) * dim] = w @ v[:, h // (hq // hk)]
    return out


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-5), ("bfloat16", 1e-2)])
@pytest.mark.parametrize("seq_lens", [[1], [640], [2047], [1, 17, 300, 64, 1000, 33], list(range(1, 700, 11))])
def test_paged_decode_attention_reads_the_cache_in_place_correctly(torch, fused, dtype, tol, seq_lens):
    meta, cache, q, tables, seq = _decode_step(torch, fused, dtype, seq_lens)
    plan = fused.attention_plan(meta, cache)
    assert [g.tables is not None for g in plan.groups] == [True]  # the fused decode path was taken
    out = fused.paged_attention(q, cache, plan, 0.125)
    assert _rel(out, _reference(torch, q, cache, tables, seq, 0.125)) < tol


def test_the_fused_layer_pieces_match_the_op_path_in_bfloat16(torch, fused, plain):
    from overlapd.stages.model.config import NAMED_SHAPES
    from overlapd.stages.model.rope import cos_sin_tables

    x = torch.randn(64, 2048, device="cuda").bfloat16()
    res = torch.randn(64, 2048, device="cuda").bfloat16()
    w = (torch.rand(2048, device="cuda") + 0.5).bfloat16()
    got, got_res = fused.add_rms_norm(x, res.clone(), w, 1e-5)
    want, want_res = plain.add_rms_norm(x, res.clone(), w, 1e-5)
    assert torch.equal(got_res, want_res)  # the sum is rounded exactly as the op path rounds it
    assert _rel(got, want) < 1e-2

    g = torch.randn(64, 2 * 8192, device="cuda").bfloat16()
    assert _rel(fused.silu_and_mul(g), plain.silu_and_mul(g)) < 1e-2

    cfg = NAMED_SHAPES["llama-3.2-1b"]
    tables_f = fused.rope_tables(*cos_sin_tables(cfg, 4096))
    tables_p = plain.rope_tables(*cos_sin_tables(cfg, 4096))
    meta, cache_f, *_ = _decode_step(torch, fused, "bfloat16", [5, 4096, 77, 1, 2000])
    _, cache_p, *_ = _decode_step(torch, plain, "bfloat16", [5, 4096, 77, 1, 2000])
    qkv = torch.randn(5, 48, 64, device="cuda").bfloat16()
    q_f = fused.rope_and_cache_kv(qkv, 32, 8, fused.rope_plan(meta.positions, tables_f), cache_f,
                                  fused.attention_plan(meta, cache_f))
    q_p = plain.rope_and_cache_kv(qkv, 32, 8, plain.rope_plan(meta.positions, tables_p), cache_p,
                                  plain.attention_plan(meta, cache_p))
    assert _rel(q_f, q_p) < 1e-2
    assert _rel(cache_f.k, cache_p.k) < 1e-2
    assert torch.equal(cache_f.v, cache_p.v)


def test_greedy_argmax_takes_the_first_maximum_like_torch(torch, fused):
    logits = torch.randn(64, 128256, device="cuda")
    logits[1, [5000, 9000, 128000]] = 50.0  # ties across blocks
    logits[2, [4095, 4096]] = 50.0  # across a block boundary
    logits[3, -1] = 50.0  # in the last, partial block
    assert torch.equal(fused.argmax(logits, axis=-1), torch.argmax(logits, dim=-1))
    assert torch.equal(fused.argmax(logits[:1], axis=-1), torch.argmax(logits[:1], dim=-1))


@pytest.mark.parametrize("n,k", [(3072, 2048), (2048, 2048), (16384, 2048), (2048, 8192), (128256, 2048),
                                 (6144, 4096), (4096, 14336), (1000, 1000)])
def test_triton_gemv_matches_cublas_within_bf16_rounding(torch, n, k):
    """kernels/triton_gemv.py (batch-1 products) on the 1B and 8B shapes' matrices
    and a ragged one, each prologue and epilogue launched with programmatic
    dependent launch: bf16 within 1e-2 relative of the cuBLAS composition (both
    sum bf16 products in float32, in different orders, then round once); float32
    within 1e-5 of a float64 product; repeated calls give the same bits (no atomics)."""
    from overlapd.kernels import triton_decode as td
    from overlapd.kernels import triton_gemv as tg

    pdl = tg.pdl_supported(torch.device("cuda"))
    g = torch.Generator(device="cuda")
    g.manual_seed(n + k)
    w = torch.randn(n, k, generator=g, device="cuda")
    x = torch.randn(1, k, generator=g, device="cuda")
    wb, xb = w.bfloat16(), x.bfloat16()
    got = tg.gemv(xb, wb, pdl)
    want = torch.nn.functional.linear(xb, wb)
    assert got.dtype == torch.bfloat16 and got.shape == (1, n)
    assert _rel(got, want) < 1e-2
    assert torch.equal(got, tg.gemv(xb, wb, pdl))
    ref = x.double() @ w.double().T
    assert float((tg.gemv(x, w, pdl).double() - ref).norm() / ref.norm()) < 1e-5
    nw = (1 + 0.1 * torch.randn(k, generator=g, device="cuda")).bfloat16()
    normed = td.add_rms_norm(xb, None, nw, 1e-5)[0]
    normed_out = tg.norm_linear(xb, nw, 1e-5, wb, pdl)
    assert _rel(normed_out, torch.nn.functional.linear(normed, wb)) < 1e-2
    logits = tg.norm_linear(xb, nw, 1e-5, wb, pdl, torch.float32)  # the lm_head's: bf16 values in float32
    assert logits.dtype == torch.float32 and torch.equal(logits, normed_out.float())
    r0 = torch.randn(1, n, generator=g, device="cuda").bfloat16()
    r = r0.clone()
    tg.linear_add_(r, xb, wb, pdl)
    assert _rel(r, r0 + want) < 1e-2
    gu = torch.randn(1, 2 * k, generator=g, device="cuda").bfloat16()
    r = r0.clone()
    tg.swiglu_linear_add_(r, gu, wb, pdl)
    assert _rel(r, r0 + torch.nn.functional.linear(td.silu_and_mul(gu), wb)) < 1e-2


def test_one_token_layers_replay_from_a_graph_with_programmatic_launch(torch):
    """Four 1B-shaped layers of the one-token chain (products, RoPE + KV write,
    attention) captured in a CUDA graph with programmatic dependent launch:
    every replay gives the eager chain's bits, and the chain stays within bf16
    rounding of the same layers without PDL (each kernel waits before it reads
    what the one before wrote, or a replay would race)."""
    from overlapd.kernels import triton_decode as td
    from overlapd.kernels import triton_gemv as tg

    if not tg.pdl_supported(torch.device("cuda")):
        pytest.skip("programmatic dependent launch needs compute capability 9.0")
    g = torch.Generator(device="cuda")
    g.manual_seed(5)
    h, hq, hk, d, inter, bs, ctx = 2048, 32, 8, 64, 8192, 16, 300

    def rnd(*shape):
        return (torch.randn(*shape, generator=g, device="cuda") / shape[-1] ** 0.5).bfloat16()

    layers = [(rnd((hq + 2 * hk) * d, h), rnd(h, hq * d), rnd(2 * inter, h), rnd(h, inter)) for _ in range(4)]
    nw = (1 + 0.1 * torch.randn(h, generator=g, device="cuda")).bfloat16()
    blocks = -(-ctx // bs)
    caches = [(torch.randn(blocks, bs, hk, d, generator=g, device="cuda").bfloat16(),
               torch.randn(blocks, bs, hk, d, generator=g, device="cuda").bfloat16()) for _ in layers]
    tables = torch.arange(blocks, device="cuda").view(1, -1)
    seq = torch.tensor([ctx], device="cuda")
    pos, slot = seq - 1, seq - 1
    cos = torch.randn(ctx, d, generator=g, device="cuda")
    sin = torch.randn(ctx, d, generator=g, device="cuda")
    r0 = torch.randn(1, h, generator=g, device="cuda").bfloat16()
    out = torch.empty_like(r0)

    def chain(pdl: bool) -> None:
        r = r0.clone()
        for (wqkv, wo, wgu, wd), (kc, vc) in zip(layers, caches):
            qkv = tg.norm_linear(r, nw, 1e-5, wqkv, pdl).view(1, hq + 2 * hk, d)
            q = td.rope_and_cache_kv(qkv, hq, hk, pos, cos, sin, slot, kc.view(-1, hk, d), vc.view(-1, hk, d),
                                     pdl=pdl)
            tg.linear_add_(r, td.paged_decode_attention(q, kc, vc, tables, seq, ctx, 0.125, pdl=pdl), wo, pdl)
            tg.swiglu_linear_add_(r, tg.norm_linear(r, nw, 1e-5, wgu, pdl), wd, pdl)
        out.copy_(r)

    chain(False)
    plain = out.clone()
    chain(True)
    eager = out.clone()
    assert _rel(eager, plain) < 1e-2
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        chain(True)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        chain(True)
    for _ in range(20):
        out.zero_()
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, eager)
