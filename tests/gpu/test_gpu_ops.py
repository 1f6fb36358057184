"""The Torch runtime's ops on CUDA against plain references (float64 on the CPU)."""

from __future__ import annotations

import numpy as np
import pytest
from gpu_support import requires_gpu

pytestmark = requires_gpu


@pytest.fixture(scope="module")
def ops(torch):
    from overlapd.stages.runtime.torch_ops import TorchOps

    return TorchOps("gpu")


def _rel_err(out: np.ndarray, ref: np.ndarray) -> float:
    assert np.isfinite(out).all()
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def _mixed_step(torch, ops, rng, dtype: str, hq: int = 8, hk: int = 2, dim: int = 64, bs: int = 16):
    """A step of decodes and prefill chunks over a paged cache of random keys and values."""
    from overlapd.stages.runtime.ops import AttentionMetadata

    qlens = np.array([1, 5, 1, 9, 1], np.int64)
    seqlens = np.array([20, 37, 3, 9, 64], np.int64)
    num_blocks, max_blocks = 40, 4
    cache = ops.allocate_kv_cache(num_blocks, bs, hk, dim, dtype)
    cache.k.copy_(torch.randn(cache.k.shape, device="cuda"))
    cache.v.copy_(torch.randn(cache.v.shape, device="cuda"))
    perm = rng.permutation(num_blocks)[: len(qlens) * max_blocks].reshape(len(qlens), max_blocks)
    tables = perm.astype(np.int64)
    positions = np.concatenate([np.arange(s - q, s) for q, s in zip(qlens, seqlens)])
    token_rows = np.repeat(np.arange(len(qlens)), qlens)
    slots = tables[token_rows, positions // bs] * bs + positions % bs
    qsl = np.concatenate([[0], np.cumsum(qlens)])
    meta = AttentionMetadata(
        num_tokens=int(qlens.sum()), num_rows=len(qlens), block_size=bs,
        positions=ops.from_numpy(positions), token_rows=ops.from_numpy(token_rows),
        query_start_loc=ops.from_numpy(qsl), seq_lens=ops.from_numpy(seqlens),
        block_tables=ops.from_numpy(tables), slot_mapping=ops.from_numpy(slots),
        query_lens_host=qlens, seq_lens_host=seqlens)
    q = torch.randn(int(qlens.sum()), hq, dim, device="cuda").to(cache.k.dtype)
    return meta, cache, q, tables, positions, token_rows


def _reference_attention(q, k_all, v_all, tables, positions, token_rows, bs, scale):
    """Each token attends to its row's positions 0..pos; float64, grouped-query heads repeated."""
    hq, hk = q.shape[1], k_all.shape[2]
    out = np.zeros((q.shape[0], hq * q.shape[2]))
    for t in range(q.shape[0]):
        pos = np.arange(positions[t] + 1)
        blocks = tables[token_rows[t], pos // bs]
        k = k_all[blocks, pos % bs]  # [L, Hk, D]
        v = v_all[blocks, pos % bs]
        for h in range(hq):
            s = k[:, h // (hq // hk)] @ q[t, h] * scale
            p = np.exp(s - s.max())
            out[t, h * q.shape[2]:(h + 1) * q.shape[2]] = (p / p.sum()) @ v[:, h // (hq // hk)]
    return out


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-4), ("bfloat16", 2e-2)])
def test_paged_attention_matches_a_dense_reference(torch, ops, dtype, tol):
    rng = np.random.default_rng(0)
    meta, cache, q, tables, positions, token_rows = _mixed_step(torch, ops, rng, dtype)
    plan = ops.attention_plan(meta, cache)
    out = ops.paged_attention(q, cache, plan, 0.125)
    ref = _reference_attention(q.double().cpu().numpy(), cache.k.double().cpu().numpy(),
                               cache.v.double().cpu().numpy(), tables, positions, token_rows, 16, 0.125)
    assert _rel_err(out.double().cpu().numpy(), ref) < tol


def test_kv_writes_land_at_their_slots(torch, ops):
    rng = np.random.default_rng(1)
    meta, cache, q, *_ = _mixed_step(torch, ops, rng, "float32")
    plan = ops.attention_plan(meta, cache)
    k = torch.randn(meta.num_tokens, 2, 64, device="cuda")
    v = torch.randn(meta.num_tokens, 2, 64, device="cuda")
    ops.write_kv_cache_(cache, k, v, plan)
    slots = meta.slot_mapping.cpu()
    assert torch.equal(cache.k_flat[slots].cpu(), k.cpu()) and torch.equal(cache.v_flat[slots].cpu(), v.cpu())


def test_rms_norm_rope_and_silu_match_references(torch, ops):
    from overlapd.stages.model.config import NAMED_SHAPES
    from overlapd.stages.model.rope import cos_sin_tables

    x = torch.randn(7, 2048, device="cuda")
    w = torch.rand(2048, device="cuda") + 0.5
    ref = x.double() / torch.sqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-5) * w.double()
    assert _rel_err(ops.rms_norm(x, w, 1e-5).double().cpu().numpy(), ref.cpu().numpy()) < 1e-5

    cfg = NAMED_SHAPES["llama-3.2-1b"]
    cos, sin = cos_sin_tables(cfg, 512)
    pos = np.array([0, 1, 17, 300, 511], np.int64)
    h = torch.randn(len(pos), 4, cfg.head_dim, device="cuda")
    got = ops.rotary_embedding(h, ops.rope_plan(ops.from_numpy(pos), ops.rope_tables(cos, sin)))
    hn = h.double().cpu().numpy()
    half = cfg.head_dim // 2
    c = np.concatenate([cos[pos], cos[pos]], -1)[:, None, :]
    s = np.concatenate([sin[pos], sin[pos]], -1)[:, None, :]
    rot = np.concatenate([-hn[..., half:], hn[..., :half]], -1)  # HF's rotate_half
    assert _rel_err(got.double().cpu().numpy(), hn * c + rot * s) < 1e-5

    g = torch.randn(5, 64, device="cuda")
    gd = g.double()
    ref = gd[:, :32] / (1 + torch.exp(-gd[:, :32])) * gd[:, 32:]
    assert _rel_err(ops.silu_and_mul(g).double().cpu().numpy(), ref.cpu().numpy()) < 1e-5


def test_host_copies_match_the_device_tensors(torch, ops):
    """to_host_async (the native pinned pool where built) returns exactly what is on the device."""
    for x in (torch.randint(-2**40, 2**40, (64, 7), device="cuda"), torch.randn(64, 21, device="cuda"),
              torch.randn(3, device="cuda").to(torch.bfloat16)):
        got = ops.to_host_async(x).result()
        assert np.array_equal(got, x.float().cpu().numpy() if x.dtype == torch.bfloat16 else x.cpu().numpy())


def test_tiny_model_on_gpu_gives_the_float64_reference_tokens(torch, ops):
    from engine_test_support import Driver, Req, engine_config, reference_greedy_tokens, tiny_in_memory
    from overlapd.stages.model.loader import load_model
    from overlapd.stages.model.reference import log_softmax, reference_logits
    from overlapd.stages.runner.model_runner import ModelRunner
    from overlapd.stages.step_types import SamplingParams

    prompts = [[0, 424, 13, 314, 338, 15], [0, 370, 321, 301], [0, 5, 77, 123, 300, 410, 9, 66, 701, 12, 44, 99, 250, 3]]
    loaded = load_model(engine_config(runtime="torch", device="gpu"), ops)
    d = Driver(ModelRunner(loaded, ops, engine_config(runtime="torch", device="gpu"), 128), token_budget=7)
    reqs = [d.add(Req(i + 1, p, SamplingParams(temperature=0.0, max_tokens=8, logprobs=3))) for i, p in enumerate(prompts)]
    d.run()
    for r in reqs:
        assert r.outputs == reference_greedy_tokens(r.prompt, 8)
    config, weights, _ = tiny_in_memory()
    ref = log_softmax(reference_logits(config, weights, reqs[0].prompt)[-1])
    assert abs(reqs[0].logprob_rows[0][0][0] - ref[reqs[0].outputs[0]]) < 1e-3


def test_host_zeros_are_page_locked_and_upload_exactly(torch, ops):
    """Staging arrays come from host_zeros: uploads from them skip the extra pinned copy."""
    a = ops.host_zeros([3, 1000], "int64")
    assert torch.from_numpy(a).is_pinned() and not a.any()
    a[:] = np.arange(3000).reshape(3, 1000)
    dst = ops.zeros([5, 1000], "int64")
    ops.copy_from_host_(dst, a)
    ops.copy_from_host_(dst[3:], np.full((2, 1000), 7, np.int64))  # pageable: still correct
    got = dst.cpu().numpy()
    assert np.array_equal(got[:3], a) and (got[3:] == 7).all()
