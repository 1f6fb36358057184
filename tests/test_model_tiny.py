"""The embedded tiny model: deterministic, cached as a real HF checkpoint, and chatty."""

from __future__ import annotations

import hashlib
import importlib.util
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from engine_test_support import Driver, Req, make_runner, tiny_cache, tiny_in_memory, tiny_loaded  # noqa: F401
from overlapd.stages.model.tiny import ensure_tiny_checkpoint, tiny_checkpoint, train_tiny_tokenizer
from overlapd.stages.step_types import SamplingParams


def test_tokenizer_training_is_deterministic() -> None:
    a, b = train_tiny_tokenizer().to_str(), train_tiny_tokenizer().to_str()
    assert a == b


def test_tiny_checkpoint_is_deterministic() -> None:
    c1, w1, t1 = tiny_checkpoint()
    c2, w2, t2 = tiny_in_memory()
    assert c1 == c2 and t1 == t2 and w1.keys() == w2.keys()
    assert all(np.array_equal(w1[k], w2[k]) for k in w1)


def test_checkpoint_is_created_once_quickly_as_an_hf_directory(tmp_path: Path) -> None:
    t0 = time.perf_counter()
    path = ensure_tiny_checkpoint(tmp_path)
    assert time.perf_counter() - t0 < 3.0
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    digest = hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()
    mtime = (path / "model.safetensors").stat().st_mtime_ns
    assert ensure_tiny_checkpoint(tmp_path) == path and (path / "model.safetensors").stat().st_mtime_ns == mtime
    other = ensure_tiny_checkpoint(tmp_path / "again")
    assert hashlib.sha256((other / "model.safetensors").read_bytes()).hexdigest() == digest
    assert (other / "tokenizer.json").read_bytes() == (path / "tokenizer.json").read_bytes()


def test_tokenizer_is_a_real_byte_level_bpe(tiny_loaded) -> None:
    tok = tiny_loaded.tokenizer
    text = "Hello, world! Numbers like 365 and ünïcödé survive."
    ids = tok.encode(text)
    assert ids[0] == tiny_loaded.config.bos_token_id and len(ids) < len(text.encode()) * 0.8
    assert tok.decode(ids) == text
    assert tok.vocab_size == tiny_loaded.config.vocab_size


def test_greedy_hello_does_not_stop_on_eos(tiny_loaded) -> None:
    eos = set(tiny_loaded.eos_token_ids)
    prompts = ["Hello", "Hello!", "What is your name?", "The weather today is", "def greet(name):"]
    driver = Driver(make_runner(tiny_loaded))
    reqs = [driver.add(Req(i, tiny_loaded.tokenizer.encode(p), SamplingParams(temperature=0.0, max_tokens=40)))
            for i, p in enumerate(prompts)]
    driver.run()
    for r in reqs:
        assert not eos & set(r.outputs)
        assert tiny_loaded.tokenizer.decode(r.outputs).strip()


_HF_CHECK = """
import sys, numpy as np, torch
from transformers import LlamaForCausalLM
from overlapd.stages.model.reference import reference_logits
from overlapd.stages.model.tiny import tiny_checkpoint
m = LlamaForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
config, weights, _ = tiny_checkpoint()
ids = [0, 424, 13, 314, 338, 15, 370, 321, 301, 652, 535]
with torch.no_grad():
    hf = m(torch.tensor([ids])).logits[0].double().numpy()
print(np.abs(hf - reference_logits(config, weights, ids)).max())
"""


def test_reference_matches_hugging_face_transformers(tmp_path: Path) -> None:
    """Only where torch + transformers are installed (never a dependency); in a
    subprocess so torch and paddle never share one process."""
    if importlib.util.find_spec("transformers") is None or importlib.util.find_spec("torch") is None:
        pytest.skip("torch and transformers are not installed")
    path = ensure_tiny_checkpoint(tmp_path)
    # cwd outside the checkout: `-c` puts the cwd first on sys.path, where our top-level kernels/ would
    # shadow Hugging Face's `kernels` package, which transformers 5.25 imports
    out = subprocess.run([sys.executable, "-c", _HF_CHECK, str(path)], capture_output=True, text=True, timeout=120,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert float(out.stdout.strip().splitlines()[-1]) < 1e-4
