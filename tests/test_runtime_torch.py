"""The Torch runtime runs the same model, sampler and runner (only where torch is installed)."""

from __future__ import annotations

import importlib.util
import json
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
    assert r["greedy_ok"]
    assert r["logprob_err"] < 1e-4
    assert r["seeded_same"] and r["distinct"] > 3
