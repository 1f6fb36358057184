"""Batch-1 products on the device, for bench/gpu.py's `gemv` and `chain` sections.

`gemv_bench`: one product of each of a model's matrices, cuBLAS (F.linear)
against kernels/triton_gemv.py at a few rows-per-program choices; copies of
each matrix rotate so every timed product reads from HBM, not L2.

`pdl_probe`: whether a kernel launched with programmatic dependent launch
starts before the kernel ahead of it ends, eagerly and replayed from a graph.

`chain_bench`: the products of all layers of a one-token step, in order, as
LlamaModel's one-token path runs them (attention left out: the chain of
products and their glue is what is measured), each layer with its own
weights: cuBLAS with the separate norm / SwiGLU / residual kernels (the
batch-64 path's kernels at one row) against the fused products, with and
without programmatic dependent launch. Bytes are the weights read.
"""

from __future__ import annotations

import os
import statistics
from typing import Callable

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait, globaltimer

from sampler_bench import _time_graph


def _shapes(model: str) -> dict[str, tuple[int, int]]:
    from overlapd.stages.model.config import NAMED_SHAPES

    c = NAMED_SHAPES[model]
    h, i = c.hidden_size, c.intermediate_size
    return {"qkv": (c.q_size + 2 * c.kv_size, h), "o": (h, c.q_size), "gate_up": (2 * i, h), "down": (h, i),
            "lm_head": (c.vocab_size, h)}


def gemv_bench(model: str, block_ns: tuple[int, ...] = (2, 4, 8, 16)) -> dict:
    from overlapd.kernels.triton_gemv import gemv, plan

    out: dict = {}
    for name, (n, k) in _shapes(model).items():
        copies = max(2, -(-256 << 20) // (n * k * 2))
        ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        ref = F.linear(x, ws[0]).float()
        row: dict = {"n": n, "k": k, "plan": plan(n, k), "rel_err": float((gemv(x, ws[0]).float() - ref).norm()
                                                                           / ref.norm())}
        us = _time_graph(lambda: [F.linear(x, w) for w in ws]) / copies
        row["cublas_us"], row["cublas_TBps"] = us, n * k * 2 / us / 1e6
        us = _time_graph(lambda: [gemv(x, w) for w in ws]) / copies
        row["triton_us"], row["triton_TBps"] = us, n * k * 2 / us / 1e6
        for bn in block_ns:  # the rows-per-program sweep (plan() reads the override per call)
            os.environ["OVERLAPD_GEMV_BLOCK_N"] = str(bn)
            try:
                row[f"triton_bn{bn}_us"] = _time_graph(lambda: [gemv(x, w) for w in ws]) / copies
            finally:
                os.environ.pop("OVERLAPD_GEMV_BLOCK_N")
        out[name] = row
        ws.clear()
    torch.cuda.empty_cache()
    return out


def chain_bench(model: str, layers: int | None = None, reps: int = 30) -> dict:
    from overlapd.kernels import triton_decode as td
    from overlapd.kernels import triton_gemv as tg
    from overlapd.stages.model.config import NAMED_SHAPES

    c = NAMED_SHAPES[model]
    layers = layers or c.num_hidden_layers
    sh = _shapes(model)
    h, q = c.hidden_size, c.q_size
    g = torch.Generator(device="cuda")
    g.manual_seed(0)

    def rnd(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g, device="cuda") / shape[-1] ** 0.5).to(torch.bfloat16)

    ws = [{name: rnd(*sh[name]) for name in ("qkv", "o", "gate_up", "down")} for _ in range(layers)]
    norms = [(1 + 0.1 * torch.randn(h, generator=g, device="cuda")).to(torch.bfloat16) for _ in range(2)]
    r0 = torch.randn(1, h, generator=g, device="cuda").to(torch.bfloat16)
    nbytes = sum(w.numel() * 2 for lw in ws for w in lw.values())

    def ops_chain() -> torch.Tensor:  # what the one-token step ran before: cuBLAS and separate kernels
        hid, res = r0.clone(), None
        for lw in ws:
            x, res = td.add_rms_norm(hid, res, norms[0], 1e-5)
            a = F.linear(x, lw["qkv"])[:, :q]
            hid = F.linear(a.contiguous(), lw["o"])
            x, res = td.add_rms_norm(hid, res, norms[1], 1e-5)
            hid = F.linear(td.silu_and_mul(F.linear(x, lw["gate_up"])), lw["down"])
        return res + hid

    def fused_chain(pdl: bool) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            r = r0.clone()
            for lw in ws:
                a = tg.norm_linear(r, norms[0], 1e-5, lw["qkv"], pdl)[:, :q]
                tg.linear_add_(r, a.contiguous(), lw["o"], pdl)
                tg.swiglu_linear_add_(r, tg.norm_linear(r, norms[1], 1e-5, lw["gate_up"], pdl), lw["down"], pdl)
            return r
        return run

    out: dict = {"layers": layers, "weight_bytes": nbytes}
    want = ops_chain().float()
    runs = (("ops", ops_chain, {}), ("fused", fused_chain(False), {}), ("fused_pdl", fused_chain(True), {}),
            ("fused_pdl_tile8k", fused_chain(True), {"OVERLAPD_GEMV_TILE": "8192"}),
            ("fused_pdl_bn4", fused_chain(True), {"OVERLAPD_GEMV_BLOCK_N": "4"}))
    for name, fn, env in runs:  # plan() reads the overrides when the graph is captured
        os.environ.update(env)
        try:
            got = fn().float()
            out[f"{name}_rel_err"] = float((got - want).norm() / want.norm())
            us = statistics.median(_time_graph(fn, reps) for _ in range(3))
        finally:
            for k in env:
                os.environ.pop(k)
        out[f"{name}_us"], out[f"{name}_TBps"] = us, nbytes / us / 1e6
        out[f"{name}_speedup"] = out["ops_us"] / us
    ws.clear()
    torch.cuda.empty_cache()
    return out


@triton.jit
def _spin_kernel(t_ptr, ns):
    gdc_launch_dependents()
    start = globaltimer()
    now = start
    while now - start < ns:
        now = globaltimer()
    tl.store(t_ptr, globaltimer())


@triton.jit
def _stamp_kernel(t_ptr):
    tl.store(t_ptr + 1, globaltimer())  # before the wait: a probe's own slot, nothing the spin writes
    gdc_wait()
    tl.store(t_ptr + 2, globaltimer())


def pdl_probe(spin_us: int = 20) -> dict:
    """(spin end - stamp start) in us: positive when the second kernel started
    while the first still ran (PDL took effect), eagerly and from a graph."""
    t = torch.zeros(3, dtype=torch.int64, device="cuda")

    def pair() -> None:
        _spin_kernel[(1,)](t, spin_us * 1000, num_warps=1)
        _stamp_kernel[(1,)](t, num_warps=1, launch_pdl=True)

    out: dict = {}
    pair()  # the first call compiles the kernels on the host between the two launches
    torch.cuda.synchronize()
    pair()
    torch.cuda.synchronize()
    out["eager_overlap_us"] = float(t[0] - t[1]) / 1e3
    out["eager_wait_after_end_us"] = float(t[2] - t[0]) / 1e3
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        pair()
    g.replay()
    torch.cuda.synchronize()
    out["graph_overlap_us"] = float(t[0] - t[1]) / 1e3
    out["graph_wait_after_end_us"] = float(t[2] - t[0]) / 1e3
    return out
