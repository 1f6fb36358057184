"""The Torch runtime runs the same model, sampler and runner (only where torch is installed)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch is not installed (optional)")
def test_torch_runtime_gives_reference_tokens_and_batch_invariant_seeds() -> None:
    script = Path(__file__).with_name("torch_runtime_check.py")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["greedy_ok"] and r["greedy_one_ok"]
    assert r["logprob_err"] < 1e-4
    assert r["seeded_same"] and r["distinct"] > 3


_NO_TRITON = importlib.util.find_spec("torch") is None or importlib.util.find_spec("triton") is None


def _run_check(script: str, env: dict[str, str]) -> dict:
    path = Path(__file__).with_name(script)
    out = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=300,
                         env={**os.environ, **env})
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(_NO_TRITON, reason="torch and triton are not installed (optional)")
def test_fused_decode_kernels_match_the_ops_they_replace() -> None:
    """kernels/triton_decode.py under Triton's CPU interpreter, float32, against the op path."""
    r = _run_check("triton_kernels_check.py", {"TRITON_INTERPRET": "1"})
    for name in ("add_rms_norm", "rms_norm", "silu_and_mul", "rope_q", "rope_k", "attention_direct",
                 "attention_partitioned"):
        assert r[name] < 1e-5, (name, r[name])
    assert r["residual_in_place"] and r["rms_norm_returns_x"] and r["cache_v_exact"] and r["argmax_same"]
    assert r["attention_direct_parts"] == 1 and r["attention_partitioned_parts"] > 1
    for name in ("gemv_wide", "gemv_split", "gemv_ragged"):  # relative to the largest output
        for part in ("", "_norm", "_add", "_swiglu"):
            assert r[name + part] < 1e-6, (name + part, r[name + part])
        assert r[name + "_add_in_place"]
    assert r["gemv_wide_split"] == 1 and r["gemv_split_split"] > 1
    # the sort-free sampler draws draw_reference's token, with either key width, deciding in the same
    # round (greedy rows -1, rejection rounds, the fallback's 4), on every row rounding cannot move
    for bits in (16, 32):
        assert r[f"sample_same_{bits}"] == r[f"sample_sure_{bits}"] >= r["sample_rows"] - 3, (bits, r)
        assert r[f"sample_rounds_same_{bits}"] and r[f"sample_distinct_{bits}"] > 15, (bits, r)
        assert {-1, 1, 2, 4} <= set(r[f"sample_rounds_{bits}"]) and r[f"sample_greedy_first_max_{bits}"], (bits, r)
    # the logprob kernels give the ops path's ids, ranks and stop codes, values within float32 rounding
    for name in ("lp_long", "lp_long5", "lp_wide", "lp_narrow", "lp_small"):
        assert r[name + "_ints_same"] and r[name + "_err"] < 1e-5 and r[name + "_tie_order"], (name, r)
    assert r["metadata_same"]  # a decode step's attention metadata in one kernel, equal to the op path


@pytest.mark.skipif(_NO_TRITON, reason="torch and triton are not installed (optional)")
def test_the_model_with_fused_kernels_gives_reference_tokens() -> None:
    """The whole engine with every fused kernel on (as on a GPU), run by the interpreter."""
    r = _run_check("torch_runtime_check.py", {"TRITON_INTERPRET": "1", "OVERLAPD_FUSED": "1"})
    assert r["fused"] and r["greedy_ok"] and r["logprob_err"] < 1e-4
    assert r["fused_products"] and r["greedy_one_ok"]  # one-token steps through kernels/triton_gemv.py
    assert r["seeded_same"] and r["distinct"] > 3


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch is not installed (optional)")
def test_the_gpu_bench_runs_its_profile_section_on_the_cpu() -> None:
    """bench/gpu.py's own CPU smoke path: the real engine under torch.profiler
    through the bench's shared loader (a GPU session must not be the first to
    find the bench broken)."""
    bench = Path(__file__).parents[1] / "bench" / "gpu.py"
    out = subprocess.run([sys.executable, str(bench), "--device", "cpu", "--model", "tiny", "--sections", "profile"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "section profile_b1_eager failed" not in out.stdout, out.stdout[-3000:]
    summary = next(line for line in out.stdout.splitlines() if line.startswith("profile_b1_eager"))
    assert int(summary.split()[1]) > 0  # kernels (CPU ops here) per step
