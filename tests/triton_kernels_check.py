"""Checks kernels/triton_decode.py against the Torch ops it replaces; prints one JSON line.

Run by test_runtime_torch.py in a subprocess under TRITON_INTERPRET=1 (Triton's
interpreter runs the kernels on the CPU with numpy), so torch never shares a
process with paddle. float32 only: the interpreter's bfloat16 dot products
are not faithful; tests/gpu checks bfloat16 on the device.
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from overlapd.kernels import triton_decode as td  # noqa: E402
from overlapd.stages.runtime import composed  # noqa: E402
from overlapd.stages.runtime.torch_ops import TorchOps  # noqa: E402


def err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


def dense_decode_reference(q, k_cache, v_cache, tables, seq_lens, scale) -> torch.Tensor:
    rows, hq, d = q.shape
    bs, hk = k_cache.shape[1], k_cache.shape[2]
    out = torch.empty(rows, hq * d, dtype=torch.float64)
    for r in range(rows):
        pos = torch.arange(int(seq_lens[r]))
        blocks = tables[r][pos // bs]
        k, v = k_cache[blocks, pos % bs].double(), v_cache[blocks, pos % bs].double()
        for h in range(hq):
            p = torch.softmax(k[:, h // (hq // hk)] @ q[r, h].double() * scale, 0)
            out[r, h * d:(h + 1) * d] = p @ v[:, h // (hq // hk)]
    return out


def main() -> None:
    torch.manual_seed(0)
    ops = TorchOps("cpu")  # OVERLAPD_FUSED unset: the op path, the reference here
    assert ops._fused is None
    r: dict[str, object] = {}

    x, res, w = torch.randn(5, 2048), torch.randn(5, 2048), torch.rand(2048) + 0.5
    want, want_sum = composed.add_rms_norm(ops, x, res.clone(), w, 1e-5)
    got, got_sum = td.add_rms_norm(x, res, w, 1e-5)
    r["add_rms_norm"] = max(err(got, want), err(got_sum, want_sum))
    r["residual_in_place"] = got_sum is res
    got, same = td.add_rms_norm(x, None, w, 1e-5)
    r["rms_norm"] = err(got, ops.rms_norm(x, w, 1e-5))
    r["rms_norm_returns_x"] = same is x

    g = torch.randn(3, 2 * 1500)
    r["silu_and_mul"] = err(td.silu_and_mul(g), torch.nn.functional.silu(g[:, :1500]) * g[:, 1500:])

    logits = torch.randn(6, 128256)
    logits[1, [5000, 9000, 128000]] = 50.0  # ties across blocks: the first index wins
    logits[2, [4095, 4096]] = 50.0  # a tie across a block boundary
    logits[3, -1] = 50.0  # the last, partial block
    r["argmax_same"] = bool(torch.equal(td.argmax_rows(logits), logits.argmax(dim=1)))

    # Llama-3.2-1B heads: 32 q, 8 kv, head_dim 64
    hq, hk, d, bs, nblocks = 32, 8, 64, 16, 40
    from overlapd.stages.model.config import NAMED_SHAPES
    from overlapd.stages.model.rope import cos_sin_tables

    tables = ops.rope_tables(*cos_sin_tables(NAMED_SHAPES["llama-3.2-1b"], 1024))
    pos = torch.tensor([0, 1, 17, 300, 1023])
    slots = torch.tensor([3, 640, 17, 99, 5])
    qkv = torch.randn(len(pos), hq + 2 * hk, d)
    cache_ref = ops.allocate_kv_cache(nblocks + 1, bs, hk, d, "float32")
    cache = ops.allocate_kv_cache(nblocks + 1, bs, hk, d, "float32")

    class Plan:
        slot_mapping = slots

    q_ref = composed.rope_and_cache_kv(ops, qkv, hq, hk, ops.rope_plan(pos, tables), cache_ref, Plan)
    q = td.rope_and_cache_kv(qkv, hq, hk, pos, tables[0], tables[1], slots, cache.k_flat, cache.v_flat)
    r["rope_q"] = err(q, q_ref)
    r["rope_k"] = err(cache.k, cache_ref.k)
    r["cache_v_exact"] = bool(torch.equal(cache.v, cache_ref.v))

    # decode attention: a one-token row, rows ending mid-block, one spanning many blocks
    seq_lens = torch.tensor([1, 37, 300, 129])
    rows = len(seq_lens)
    kc, vc = torch.randn(nblocks, bs, hk, d), torch.randn(nblocks, bs, hk, d)
    bt = torch.stack([torch.randperm(nblocks)[:32] for _ in range(rows)])
    qd = torch.randn(rows, hq, d)
    ref = dense_decode_reference(qd, kc, vc, bt, seq_lens, 0.125)
    for name, target in (("direct", 1), ("partitioned", 128)):
        per, parts = td.decode_partitions(rows, hk, 320, target)
        out = td.paged_decode_attention(qd, kc, vc, bt, seq_lens, 320, 0.125, target_programs=target)
        r[f"attention_{name}"] = err(out, ref)
        r[f"attention_{name}_parts"] = parts
    r.update(sampling_check())
    r.update(logprobs_check(ops))
    r.update(metadata_check(ops))
    r.update(gemv_check())
    print(json.dumps(r))


def gemv_check() -> dict:
    """kernels/triton_gemv.py in float32 against float64 products, relative to
    the largest output: one split and several, an even K and a ragged one,
    rows not a multiple of the block; each prologue and epilogue against the
    ops it replaces (rms_norm, silu_and_mul, the residual add)."""
    from overlapd.kernels import triton_gemv as tg

    g = torch.Generator().manual_seed(3)
    out: dict[str, object] = {}
    for name, (n, k) in {"gemv_wide": (9000, 1024), "gemv_split": (40, 8192), "gemv_ragged": (24, 1000)}.items():
        x, w = torch.randn(1, k, generator=g), torch.randn(n, k, generator=g)
        nw, gu = torch.rand(k, generator=g) + 0.5, torch.randn(1, 2 * k, generator=g)
        r0 = torch.randn(1, n, generator=g)
        want = x.double() @ w.double().T
        scale = float(want.abs().max())
        out[name] = err(tg.gemv(x, w), want) / scale
        normed = td.add_rms_norm(x, None, nw, 1e-5)[0].double()
        out[name + "_norm"] = err(tg.norm_linear(x, nw, 1e-5, w), normed @ w.double().T) / scale
        r = r0.clone()
        same = tg.linear_add_(r, x, w)
        out[name + "_add"] = err(r, r0.double() + want) / scale
        out[name + "_add_in_place"] = same is r
        r = r0.clone()
        tg.swiglu_linear_add_(r, gu, w)
        act = td.silu_and_mul(gu).double()
        out[name + "_swiglu"] = err(r, r0.double() + act @ w.double().T) / scale
        out[name + "_split"] = tg.plan(n, k)[2]
    return out


def sampling_check() -> dict:
    """kernels/triton_sampling.py against draw_reference on bf16-valued logits
    (exact ties, all-tied rows) with every filter, both key widths: the same
    token and deciding round on every row that float32 rounding cannot move."""
    from overlapd.kernels import triton_sampling as ts
    from sampling_reference import draw_reference

    g = torch.Generator().manual_seed(7)
    rows, vocab = 24, 5000  # several chunks of the row and a partial block
    logits = (3 * torch.randn(rows, vocab, generator=g)).to(torch.bfloat16).float()
    logits[0] = 0.0  # all tied
    logits[5, [7, 4000]] = 30.0  # a greedy row whose max is tied across chunks
    t = torch.tensor([0.8, 0.05, 1.0, 2.5, 0.0, 1.3] * (rows // 6), dtype=torch.float32)
    top_p = torch.tensor([0.95, 1.0, 0.5, 0.001, 0.9, 0.3, 0.99, 0.7] * (rows // 8), dtype=torch.float32)
    top_k = torch.tensor([0, 1, 40, 3000, 0, 7000, 0, 2, 0, 0, 50, 0] * (rows // 12), dtype=torch.int64)
    state = torch.randint(0, 1 << 31, (rows,), generator=g)
    out: dict = {"sample_rows": rows}
    for bits, shift in ((16, 16), (32, 0)):
        rounds = torch.empty(rows, dtype=torch.int32)
        got = ts.sample(logits, t, top_p, top_k, state, key_bits=bits, rounds=rounds).numpy()
        want, want_rounds, amb = draw_reference(logits.numpy(), t.numpy(), top_p.numpy(), top_k.numpy(),
                                                state.numpy(), shift)
        sure = ~amb  # rows whose draw float32 rounding cannot move
        out[f"sample_sure_{bits}"] = int(sure.sum())
        out[f"sample_same_{bits}"] = int((got == want)[sure].sum())
        out[f"sample_rounds_same_{bits}"] = bool((rounds.numpy() == want_rounds)[sure].all())
        out[f"sample_rounds_{bits}"] = sorted(set(rounds.tolist()))
        out[f"sample_distinct_{bits}"] = len(set(got.tolist()))
        out[f"sample_greedy_first_max_{bits}"] = int(got[5]) == 7
    return out

def metadata_check(ops: TorchOps) -> dict:
    """kernels/triton_metadata.py against build_attention_metadata's op path on a
    decode step: rows in another order than their persistent rows, positions at
    block starts, ends and middles."""
    from overlapd.kernels.triton_metadata import decode_metadata
    from overlapd.stages.model.paged_metadata import build_attention_metadata

    g = torch.Generator().manual_seed(9)
    rows, max_rows, max_blocks, bs = 6, 10, 40, 16
    tables = torch.randint(0, 5000, (max_rows, max_blocks), generator=g)
    slots = torch.tensor([7, 2, 9, 0, 4, 5])
    start = torch.tensor([0, 15, 16, 31, 300, max_blocks * bs - 1])
    want = build_attention_metadata(ops, num_tokens=rows, block_size=bs, query_start_loc=torch.arange(rows + 1),
                                    start_pos=start, seq_lens=start + 1, row_slots=slots, block_tables=tables,
                                    query_lens_host=np.ones(rows, np.int64), seq_lens_host=(start + 1).numpy())
    got = decode_metadata(start, slots, tables, bs)
    same = [torch.equal(a, b) for a, b in zip(got, (want.positions, want.token_rows, want.block_tables,
                                                    want.slot_mapping))]
    return {"metadata_same": all(same)}


def logprobs_check(ops: TorchOps) -> dict:
    """kernels/triton_logprobs.py against the ops path's pack (log_softmax, topk,
    gather, count) on float32 logits with a tie across tiles and a tiny
    vocabulary's single partial tile; every width the runner asks for."""
    from overlapd.kernels.triton_logprobs import pack
    from overlapd.stages.sampling.sampler import Sampler

    g = torch.Generator().manual_seed(5)
    out: dict = {}
    # lp_long has more tiles than k (the bound from the tile maxima prunes); lp_wide fewer
    shapes = {"lp_long": (3, 60000, 20), "lp_long5": (2, 60000, 5), "lp_wide": (5, 9000, 20),
              "lp_narrow": (3, 9000, 1), "lp_small": (4, 30, 20)}
    for name, (rows, vocab, k) in shapes.items():
        logits = 4 * torch.randn(rows, vocab, generator=g)
        tie = [100, 50000] if vocab > 50000 else [100, 5000] if vocab > 5000 else [3, 20]
        logits[0, tie] = 40.0  # tied maxima (in two tiles where there are two): ids in vocabulary order
        sampled = torch.randint(0, vocab, (rows,), generator=g)
        finish = torch.arange(rows, dtype=torch.int64)
        want = Sampler(ops, vocab).pack(logits, sampled, finish, k)
        ints, lps = pack(logits, sampled, finish, k)
        # torch.topk orders ties as it likes (reversed here): row 0 is compared as a set
        out[name + "_ints_same"] = bool(torch.equal(ints[1:], want.ints[1:])
                                        and torch.equal(ints[0].sort().values, want.ints[0].sort().values))
        out[name + "_err"] = err(lps, want.logprobs)
        out[name + "_tie_order"] = ints[0, 3:3 + min(k, 2)].tolist() == tie[:k]
    return out


if __name__ == "__main__":
    main()
