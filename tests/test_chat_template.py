"""Chat templates: rendered in jinja2's sandbox, with the model's special tokens, never twice a bos."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine_test_support import get_ops, tiny_in_memory
from gguf_files import write_llama_gguf
from overlapd.stages.engine.config import EngineConfig
from overlapd.stages.model.chat_template import ChatTemplate, ChatTemplateError
from overlapd.stages.model.loader import ModelLoadError, load_model

CHATML = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
HI = [{"role": "user", "content": "Hi"}]


def test_a_template_renders_messages_and_the_generation_prompt() -> None:
    t = ChatTemplate(CHATML, bos_token="<s>")
    assert t.render(HI) == "<s><|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert t.render(HI, add_generation_prompt=False) == "<s><|im_start|>user\nHi<|im_end|>\n"
    assert ChatTemplate(None).render(HI) == "user: Hi\nassistant:"


def test_templates_cannot_reach_python_objects() -> None:
    for evil in ("{{ messages.__class__.__mro__ }}", "{{ ''.__class__.__subclasses__() }}",
                 "{{ messages.append(1) }}", "{% for i in range(10**9) %}{% endfor %}"):
        with pytest.raises(ChatTemplateError):
            ChatTemplate(evil).render(HI)


def test_bad_messages_and_template_errors_say_what_is_wrong() -> None:
    t = ChatTemplate(CHATML)
    with pytest.raises(ChatTemplateError, match="at least one message"):
        t.render([])
    with pytest.raises(ChatTemplateError, match=r"messages\[0\].role must be one of"):
        t.render([{"role": "wizard", "content": "x"}])
    with pytest.raises(ChatTemplateError, match=r"messages\[1\].content must be a string"):
        t.render([*HI, {"role": "assistant", "content": 3}])
    picky = ChatTemplate("{% if messages[0]['role'] != 'system' %}{{ raise_exception('system first') }}{% endif %}")
    with pytest.raises(ChatTemplateError, match="system first"):
        picky.render(HI)
    with pytest.raises(ChatTemplateError, match="does not compile"):
        ChatTemplate("{% for %}")


def test_a_model_whose_tokenizer_adds_bos_gets_exactly_one(tmp_path: Path) -> None:
    """The tiny tokenizer prepends bos; a template's {{ bos_token }} then renders empty."""
    config, weights, tok_json = tiny_in_memory()
    path = write_llama_gguf(tmp_path / "chat.gguf", config, weights, tok_json, chat_template=CHATML)
    loaded = load_model(EngineConfig(model=str(path), max_model_len=128), get_ops())
    ids = loaded.tokenizer.encode(loaded.chat_template.render(HI))
    assert ids[0] == config.bos_token_id and ids.count(config.bos_token_id) == 1


def test_a_model_with_a_broken_template_fails_at_load(tmp_path: Path) -> None:
    config, weights, tok_json = tiny_in_memory()
    path = write_llama_gguf(tmp_path / "broken.gguf", config, weights, tok_json, chat_template="{% if %}")
    with pytest.raises(ModelLoadError, match="chat template does not compile"):
        load_model(EngineConfig(model=str(path), max_model_len=128), get_ops())


def test_a_checkpoint_directory_brings_its_template_and_special_tokens(tmp_path: Path) -> None:
    import json

    from overlapd.stages.model.tiny import ensure_tiny_checkpoint

    path = ensure_tiny_checkpoint(tmp_path)
    (path / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": CHATML + "{{ eos_token }}", "bos_token": "<|begin_of_text|>",
        "eos_token": {"content": "<|end_of_text|>", "special": True}}))
    loaded = load_model(EngineConfig(model=str(path), max_model_len=128), get_ops())
    # the tiny tokenizer prepends bos itself, so the template's bos renders empty
    assert loaded.chat_template.render(HI) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<|end_of_text|>"
    (path / "tokenizer_config.json").write_text("[1, 2]")
    with pytest.raises(ModelLoadError, match="must hold a JSON object"):
        load_model(EngineConfig(model=str(path), max_model_len=128), get_ops())
