"""Loading: HF checkpoints (single file, sharded, bf16), dummy weights, and clear errors."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import struct
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from engine_test_support import get_ops, tiny_cache, tiny_in_memory  # noqa: F401
from overlapd.stages.engine.config import EngineConfig
from overlapd.stages.model.loader import ModelLoadError, build_model, load_model
from overlapd.stages.model.paged_metadata import build_attention_metadata
from overlapd.stages.model.reference import reference_logits
from overlapd.stages.model.tiny import write_hf_checkpoint
from overlapd.stages.model.tokenizer import ByteTokenizer, Tokenizer

PROMPT = [0, 424, 13, 314, 338, 15, 370, 321, 301]


def _prefill_logits(model, prompt: list[int]) -> np.ndarray:
    """Logits of every position of one prompt through the paged forward."""
    ops, bs, n = get_ops(), 4, len(prompt)
    caches = model.allocate_kv_caches(num_blocks=8, block_size=bs)
    qlens = np.array([n], np.int64)
    meta = build_attention_metadata(
        ops, num_tokens=n, block_size=bs, query_start_loc=ops.from_numpy(np.array([0, n], np.int64)),
        start_pos=ops.from_numpy(np.zeros(1, np.int64)), seq_lens=ops.from_numpy(qlens),
        row_slots=ops.from_numpy(np.zeros(1, np.int64)),
        block_tables=ops.from_numpy(np.arange(8, dtype=np.int64)[None, :]), query_lens_host=qlens, seq_lens_host=qlens)
    hidden = model.forward(ops.from_numpy(np.array(prompt, np.int64)), meta, caches)
    return ops.to_numpy(model.compute_logits(hidden, ops.arange(n)))


def _load(path: Path, **kw) -> object:
    return load_model(EngineConfig(model=str(path), max_model_len=128, **kw), get_ops())


def test_hf_checkpoint_round_trips_to_the_in_memory_model(tmp_path: Path) -> None:
    config, weights, tok_json = tiny_in_memory()
    write_hf_checkpoint(tmp_path, config, weights, tok_json)
    loaded = _load(tmp_path)
    assert loaded.config == config and isinstance(loaded.tokenizer, Tokenizer)
    assert loaded.eos_token_ids == config.eos_token_ids
    in_memory = build_model(config, weights, get_ops(), max_model_len=128)
    got = _prefill_logits(loaded.model, PROMPT)
    np.testing.assert_array_equal(got, _prefill_logits(in_memory, PROMPT))
    np.testing.assert_allclose(got, reference_logits(config, weights, PROMPT), rtol=1e-4, atol=1e-4)


def _write_bf16_safetensors(path: Path, tensors: dict[str, np.ndarray]) -> None:
    """safetensors' numpy API cannot write bfloat16: write the format by hand (truncating)."""
    header, blobs, offset = {}, [], 0
    for name, a in tensors.items():
        raw = (np.ascontiguousarray(a, np.float32).view(np.uint32) >> 16).astype("<u2").tobytes()
        header[name] = {"dtype": "BF16", "shape": list(a.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    path.write_bytes(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def test_sharded_bf16_checkpoint_with_tied_embeddings(tmp_path: Path) -> None:
    config, weights, _ = tiny_in_memory()
    config = replace(config, tie_word_embeddings=True)
    weights = {k: v for k, v in weights.items() if k != "lm_head.weight"}
    weights["model.embed_tokens.weight"] = weights["model.embed_tokens.weight"] * np.float32(0.2)
    names = sorted(weights)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    write_hf_checkpoint(tmp_path, config, {}, None)
    (tmp_path / "model.safetensors").unlink()
    save_file({n: weights[n] for n in shards["model-00001-of-00002.safetensors"]},
              str(tmp_path / "model-00001-of-00002.safetensors"))
    _write_bf16_safetensors(tmp_path / "model-00002-of-00002.safetensors",
                            {n: weights[n] for n in shards["model-00002-of-00002.safetensors"]})
    index = {"metadata": {}, "weight_map": {n: f for f, ns in shards.items() for n in ns}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 7]}))
    loaded = _load(tmp_path)
    expected = dict(weights)
    for n in shards["model-00002-of-00002.safetensors"]:  # what bf16 truncation keeps
        expected[n] = (weights[n].view(np.uint32) & np.uint32(0xFFFF0000)).view(np.float32)
    np.testing.assert_allclose(_prefill_logits(loaded.model, PROMPT), reference_logits(config, expected, PROMPT),
                               rtol=1e-4, atol=1e-4)
    assert isinstance(loaded.tokenizer, ByteTokenizer) and loaded.eos_token_ids == (1, 7)


def test_dummy_weights_are_seeded(tmp_path: Path) -> None:
    config, _, _ = tiny_in_memory()
    write_hf_checkpoint(tmp_path, config, {}, None)  # config only: dummy needs no weights
    a = _prefill_logits(_load(tmp_path, load_format="dummy", seed=1).model, PROMPT)
    b = _prefill_logits(_load(tmp_path, load_format="dummy", seed=1).model, PROMPT)
    c = _prefill_logits(_load(tmp_path, load_format="dummy", seed=2).model, PROMPT)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c) and np.isfinite(a).all() and 0.5 < a.std() < 20


def test_unknown_model_path_names_it() -> None:
    with pytest.raises(ModelLoadError, match="'/no/such/model': no such directory"):
        load_model(EngineConfig(model="/no/such/model"), get_ops())
    with pytest.raises(ModelLoadError, match="use load_format='dummy'"):
        load_model(EngineConfig(model="llama-3.2-1b"), get_ops())
    with pytest.raises(ModelLoadError, match="load_format must be one of"):
        load_model(EngineConfig(model="tiny", load_format="gguf"), get_ops())


def test_missing_config_json(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="has no config.json"):
        _load(tmp_path)


def test_wrong_tensor_shape_names_the_tensor_and_both_shapes(tmp_path: Path) -> None:
    config, weights, _ = tiny_in_memory()
    bad = dict(weights)
    bad["model.layers.2.self_attn.k_proj.weight"] = np.zeros((32, 128), np.float32)
    write_hf_checkpoint(tmp_path, config, bad, None)
    with pytest.raises(ModelLoadError, match=r"model\.layers\.2\.self_attn\.k_proj\.weight has shape \[32, 128\], "
                                             r"but config\.json implies \[64, 128\]"):
        _load(tmp_path)


def test_missing_tensor_is_named(tmp_path: Path) -> None:
    config, weights, _ = tiny_in_memory()
    write_hf_checkpoint(tmp_path, config, {k: v for k, v in weights.items() if "layers.3.mlp.up_proj" not in k}, None)
    with pytest.raises(ModelLoadError, match=r"lacks 1 tensors: model\.layers\.3\.mlp\.up_proj\.weight"):
        _load(tmp_path)


def test_max_model_len_beyond_the_model_is_refused(tmp_path: Path) -> None:
    config, weights, _ = tiny_in_memory()
    write_hf_checkpoint(tmp_path, config, weights, None)
    with pytest.raises(ModelLoadError, match="exceeds the model's max_position_embeddings"):
        load_model(EngineConfig(model=str(tmp_path), max_model_len=config.max_position_embeddings + 1), get_ops())


def test_byte_tokenizer_fallback() -> None:
    tok = ByteTokenizer(300, bos_token_id=256, eos_token_ids=(257,))
    ids = tok.encode("héllo")
    assert ids[0] == 256 and tok.decode(ids) == "héllo"
    assert tok.decode([104, 290, 257]) == "h" + chr(33 + 290 % 94)


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch is not installed (optional)")
def test_dummy_weights_drawn_on_the_device_have_the_host_draws_distributions() -> None:
    """loader.device_random_params (what a GPU loads for load_format='dummy'), run
    by the Torch runtime's generator on the CPU in a subprocess, on the 8B shape shrunk."""
    script = Path(__file__).with_name("device_weights_check.py")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["dtype"] == "bfloat16" and r["shapes_ok"] and r["layers"] == 2
    assert r["same_seed_same"] and r["other_seed_differs"]
    assert abs(r["norm_mean"] - 1) < 0.03 and abs(r["norm_std"] - 0.1) < 0.02
    for k in ("qkv_std_x_sqrt_fan_in", "down_std_x_sqrt_fan_in", "embed_std"):
        assert abs(r[k] - 1) < 0.02, (k, r[k])
    assert abs(r["head_std_x_sqrt_h"] - 3) < 0.05 and r["special_rows_zero"]
