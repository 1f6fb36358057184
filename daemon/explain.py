"""Turn msgspec's terse validation errors into sentences a person can act on.

msgspec reports e.g. "Expected `int`, got `str` - at `$.max_tokens`". Clients
and operators read our messages, so we name the field in their own words
("`max_tokens` must be an integer, not a string") and keep the path.
"""

from __future__ import annotations

import re

import msgspec

# msgspec's type words -> what a person writing a client or a TOML file calls them.
TYPE_WORDS: dict[str, str] = {
    "int": "an integer",
    "float": "a number",
    "str": "a string",
    "bool": "true or false",
    "null": "nil",
    "array": "a list",
    "object": "a map",
    "bytes": "bytes",
    "ext": "a MessagePack extension value",
    "datetime": "a date-time",
    "date": "a date",
    "time": "a time",
}

_EXPECTED = re.compile(r"^Expected `(?P<want>[^`]+)`, got `(?P<got>[^`]+)`(?: - at `\$(?P<path>[^`]*)`)?$")
_MISSING = re.compile(r"^Object missing required field `(?P<field>[^`]+)`(?: - at `\$(?P<path>[^`]*)`)?$")
_UNKNOWN = re.compile(r"^Object contains unknown field `(?P<field>[^`]+)`(?: - at `\$(?P<path>[^`]*)`)?$")
_INVALID = re.compile(r"^Invalid value (?P<value>.+?)(?: - at `\$(?P<path>[^`]*)`)?$")
_AT = re.compile(r"^(?P<msg>.*?)(?: - at `\$(?P<path>[^`]*)`)?$")


def _words(type_spec: str) -> str:
    # msgspec joins alternatives with " | ", e.g. "int | null".
    parts = [TYPE_WORDS.get(p.strip(), p.strip()) for p in type_spec.split("|")]
    return " or ".join(parts)


def field_path(path: str | None) -> str:
    """'.stop[0]' -> 'stop[0]'; '' or None -> ''."""
    if not path:
        return ""
    return path[1:] if path.startswith(".") else path


def explain_validation_error(err: msgspec.ValidationError, *, subject: str = "the frame") -> tuple[str, str]:
    """Return (field path, sentence) for a msgspec ValidationError.

    The field path is '' when the error is about the whole object. `subject`
    names the object in sentences ("the generate frame", "[server] in x.toml").
    """
    text = str(err)
    m = _EXPECTED.match(text)
    if m:
        path = field_path(m["path"])
        want, got = _words(m["want"]), _words(m["got"])
        if not path:
            return "", f"{subject[0].upper()}{subject[1:]} must be {want}, not {got}."
        return path, f"`{path}` must be {want}, not {got}."
    m = _MISSING.match(text)
    if m:
        inner = field_path(m["path"])
        name = f"{inner}.{m['field']}" if inner else m["field"]
        return name, f"{subject[0].upper()}{subject[1:]} is missing the required field `{name}`."
    m = _UNKNOWN.match(text)
    if m:
        inner = field_path(m["path"])
        name = f"{inner}.{m['field']}" if inner else m["field"]
        return name, f"`{name}` is not a known field of {subject}; remove it or check its spelling."
    m = _INVALID.match(text)
    if m:
        path = field_path(m["path"])
        return path, f"`{path or 'value'}` has an invalid value {m['value']}."
    m = _AT.match(text)
    path = field_path(m["path"]) if m else ""
    msg = m["msg"] if m else text
    if path:
        return path, f"`{path}`: {msg.rstrip('.')}."
    return "", f"{msg.rstrip('.')}."
