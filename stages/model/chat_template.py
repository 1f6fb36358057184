"""Chat templates: a model's Jinja template turned into a prompt, in jinja2's sandbox.

A template comes from the model's data (a GGUF's `tokenizer.chat_template`, a
checkpoint's tokenizer_config.json), so it is untrusted: it renders in an
immutable sandboxed environment that cannot reach Python objects beyond the
messages, with the same settings and helpers as transformers'
`apply_chat_template` (trim_blocks, lstrip_blocks, `raise_exception`,
`tojson`), so a template written for the Hugging Face ecosystem renders here
the same way. Models without a template get a plain one.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any, Mapping, Sequence

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

# For models without a template: role-tagged lines and an open assistant turn.
PLAIN_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
ROLES = ("system", "user", "assistant", "tool")
MAX_RENDERED_CHARS = 1 << 22  # a template loop cannot make a prompt bigger than this


class ChatTemplateError(ValueError):
    """Messages the template refuses, or a template that cannot render; the text says which."""


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(message)


@lru_cache(maxsize=8)
def _compile(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, autoescape=False)
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.filters["tojson"] = lambda v, indent=None: json.dumps(v, ensure_ascii=False, indent=indent)
    try:
        return env.from_string(source)
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"the model's chat template does not compile: {e}") from None


def check_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, str]]:
    """Messages as plain dicts of str, or ChatTemplateError naming the bad one."""
    if not messages:
        raise ChatTemplateError("`messages` must hold at least one message")
    out: list[dict[str, str]] = []
    for i, m in enumerate(messages):
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise ChatTemplateError(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {role!r}")
        if not isinstance(content, str):
            raise ChatTemplateError(f"messages[{i}].content must be a string")
        out.append({"role": role, "content": content})
    return out


class ChatTemplate:
    """One model's template with the special-token texts it may refer to."""

    def __init__(self, source: str | None, bos_token: str = "", eos_token: str = "") -> None:
        self.source = source or PLAIN_TEMPLATE
        self.is_plain = source is None
        self.bos_token, self.eos_token = bos_token, eos_token
        _compile(self.source)  # a broken template fails at load, not on the first request

    def render(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True) -> str:
        checked = check_messages(messages)
        try:
            text = _compile(self.source).render(
                messages=checked, add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token, eos_token=self.eos_token)
        except ChatTemplateError:
            raise
        except Exception as e:  # the template is data: whatever it raises is its failure, not the daemon's
            raise ChatTemplateError(f"the model's chat template failed on these messages: {e}") from None
        if len(text) > MAX_RENDERED_CHARS:
            raise ChatTemplateError(f"the chat template produced over {MAX_RENDERED_CHARS} characters")
        return text


__all__ = ["ChatTemplate", "ChatTemplateError", "PLAIN_TEMPLATE", "check_messages"]
