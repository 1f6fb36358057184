"""Our numerics and tokenization against Hugging Face transformers on the same GGUF weights.

transformers reads the GGUF itself (its own dequantization, q/k un-permutation
and tokenizer conversion) in a subprocess (tests/hf_gguf_reference.py); we
compare, on SmolLM2-135M-Instruct (the default model) and on the tiny model
written as a GGUF:
(a) token ids for strings with unicode, whitespace runs and special tokens,
    and the chat template's prompt;
(b) logits of every position of a few prompts, float32 on both sides;
(c) greedy generation of 32 tokens for 8 prompts through the real daemon on
    its socket, with overlap and with --no-overlap: token for token; and a
    chat through the daemon's HTTP API (the model's template, rendered by us):
    the same text as transformers' apply_chat_template + generate.
torch, transformers and accelerate come with the test extra: these run in CI.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest

from daemon_harness import serve_real
from engine_test_support import get_ops, tiny_in_memory
from gguf_files import write_llama_gguf
from http_harness import logged_port
from overlapd.daemon.client_async import AsyncClient
from overlapd.stages.engine.config import DEFAULT_MODEL, EngineConfig
from overlapd.stages.model.loader import LoadedModel, load_model
from overlapd.stages.model.packaged import packaged_model_path
from overlapd.stages.model.paged_metadata import build_attention_metadata

HERE = Path(__file__).parent
TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "  leading spaces, trailing   \n\n\ttabs and\r\nnewlines   ",
    "unicode: héllo wörld — naïve café, 你好，世界, こんにちは, emoji 🙂🚀, math ∑∫√",
    "numbers 1234567 and 3.14159, dates 2026-12-03",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>special tokens <|im_end|> inside text",
    "code: def f(x):\n    return x ** 2  # square\n",
    "",
]
CHATS = [
    [{"role": "user", "content": "Hello"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a color."},
     {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Another?"}],
]
GENERATE = [
    "The capital of France is",
    "Once upon a time, in a small village,",
    "def fibonacci(n):",
    "The three primary colors are",
    "Water boils at a temperature of",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nWrite a haiku about autumn.<|im_end|>\n<|im_start|>assistant\n",
    "In 1969, the first humans",
]
MAX_NEW = 32
# float32 on both sides, different kernels and summation orders: over 30 layers
# of SmolLM2 the logits agree to 8.8e-5 at most on a range of ~60, 1.5e-6 of the
# range (measured 2026-12-03 on these prompts); the bound leaves ten times that.
LOGIT_RTOL = 2e-5


def hf_reference(tmp: Path, gguf: Path, **spec: object) -> dict:
    (tmp / "spec.json").write_text(json.dumps({"gguf": str(gguf), **spec}))
    proc = subprocess.run([sys.executable, str(HERE / "hf_gguf_reference.py"), str(tmp / "spec.json"), str(tmp)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp / "result.json").read_text())
    result["logits"] = [np.load(tmp / f"logits_{i}.npy", allow_pickle=False)
                        for i in range(len(spec.get("logit_prompts", [])))]  # type: ignore[arg-type]
    return result


@pytest.fixture(scope="module")
def smol() -> LoadedModel:
    return load_model(EngineConfig(model=DEFAULT_MODEL, max_model_len=256), get_ops())


@pytest.fixture(scope="module")
def smol_prompts(smol: LoadedModel) -> list[list[int]]:
    return [smol.tokenizer.encode(t) for t in ("The capital of France is", TEXTS[3], TEXTS[5] + "Sure")]


@pytest.fixture(scope="module")
def smol_hf(tmp_path_factory: pytest.TempPathFactory, smol_prompts: list[list[int]]) -> dict:
    """One transformers run for (a), (b) and (c): loading the GGUF there takes ~30 s."""
    return hf_reference(tmp_path_factory.mktemp("hf-smol"), packaged_model_path(DEFAULT_MODEL), texts=TEXTS,
                        chats=CHATS, logit_prompts=smol_prompts, generate_prompts=GENERATE, generate_chats=CHATS,
                        max_new_tokens=MAX_NEW)


def our_logits(loaded: LoadedModel, ids: list[int]) -> np.ndarray:
    """Every position's logits from one prefill of `ids` through the paged model."""
    ops, model, bs = get_ops(), loaded.model, 16
    n = len(ids)
    blocks = -(-n // bs)
    caches = model.allocate_kv_caches(num_blocks=blocks, block_size=bs)
    lens = np.array([n], np.int64)
    meta = build_attention_metadata(
        ops, num_tokens=n, block_size=bs, query_start_loc=ops.from_numpy(np.array([0, n], np.int64)),
        start_pos=ops.from_numpy(np.zeros(1, np.int64)), seq_lens=ops.from_numpy(lens),
        row_slots=ops.from_numpy(np.zeros(1, np.int64)),
        block_tables=ops.from_numpy(np.arange(blocks, dtype=np.int64)[None, :]),
        query_lens_host=lens, seq_lens_host=lens)
    hidden = model.forward(ops.from_numpy(np.array(ids, np.int64)), meta, caches)
    return ops.to_numpy(model.compute_logits(hidden, ops.arange(n)))


# (a) tokenization and chat prompts ------------------------------------------

def test_smollm2_token_ids_and_chat_prompts_equal_transformers(smol: LoadedModel, smol_hf: dict) -> None:
    for text, expected in zip(TEXTS, smol_hf["ids"], strict=True):
        assert smol.tokenizer.encode(text) == expected, text
        assert smol.tokenizer.decode(expected, skip_special_tokens=False) == text
    for chat, expected in zip(CHATS, smol_hf["chat_prompts"], strict=True):
        assert smol.chat_template.render(chat) == expected


def test_tiny_gguf_tokens_and_logits_equal_transformers(tmp_path: Path) -> None:
    config, weights, tok_json = tiny_in_memory()
    path = write_llama_gguf(tmp_path / "tiny.gguf", config, weights, tok_json)
    loaded = load_model(EngineConfig(model=str(path), max_model_len=128), get_ops())
    prompt = loaded.tokenizer.encode(TEXTS[1])
    # transformers' GPT-2 tokenizer adds "<|endoftext|>" as a new id (768, past
    # the model's vocabulary) when a vocabulary lacks it, as the tiny one does
    texts = [t for t in TEXTS if "<|endoftext|>" not in t]
    hf = hf_reference(tmp_path, path, texts=texts, logit_prompts=[prompt])
    for text, expected in zip(texts, hf["ids"], strict=True):
        assert loaded.tokenizer.encode(text) == expected, text
    expected = hf["logits"][0]
    np.testing.assert_allclose(our_logits(loaded, prompt), expected, rtol=0, atol=LOGIT_RTOL * np.ptp(expected))


# (b) logits -------------------------------------------------------------------

def test_smollm2_logits_match_transformers(smol: LoadedModel, smol_prompts: list[list[int]], smol_hf: dict) -> None:
    for ids, expected in zip(smol_prompts, smol_hf["logits"], strict=True):
        ours = our_logits(smol, ids)
        assert ours.shape == expected.shape
        np.testing.assert_allclose(ours, expected, rtol=0, atol=LOGIT_RTOL * np.ptp(expected))
        assert (ours.argmax(-1) == expected.argmax(-1)).all()


# (c) greedy generation through the real daemon ---------------------------------

async def _generate_all(socket_path: Path) -> list[list[int]]:
    async with await AsyncClient.connect(socket_path, timeout=120) as client:
        streams = [await client.generate(p, max_tokens=MAX_NEW, temperature=0.0) for p in GENERATE]
        done = await asyncio.gather(*(s.complete() for s in streams))
    return [c.token_ids for c in done]


def _http_chats(base_url: str) -> list[str]:
    out = []
    for chat in CHATS:
        body = {"model": DEFAULT_MODEL, "messages": chat, "max_tokens": MAX_NEW, "temperature": 0}
        r = httpx.post(f"{base_url}/v1/chat/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        out.append(r.json()["choices"][0]["message"]["content"])
    return out


@pytest.mark.parametrize("mode", ["overlap", "no-overlap"])
def test_greedy_generation_through_the_daemon_equals_transformers(tmp_path: Path, smol_hf: dict, mode: str) -> None:
    flags = ["--model", DEFAULT_MODEL, "--http", "127.0.0.1:0"] + (["--no-overlap"] if mode == "no-overlap" else [])
    daemon = serve_real(tmp_path, *flags)
    try:
        ours = asyncio.run(_generate_all(daemon.socket_path))
        chats = _http_chats(f"http://127.0.0.1:{logged_port(daemon.log_path)}")
    finally:
        daemon.terminate()
    for prompt, got, expected in zip(GENERATE, ours, smol_hf["generated"], strict=True):
        assert got == expected, f"{prompt!r}: {got} != {expected}"
    assert chats == smol_hf["chat_texts"]
