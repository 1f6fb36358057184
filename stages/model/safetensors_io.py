"""Reading Hugging Face safetensors checkpoints into numpy, one tensor at a time.

Uses the `safetensors` package (numpy framework). numpy has no bfloat16, so
BF16 tensors (most published Llama checkpoints) are read as raw uint16 from
the offsets in the file's header and widened to float32, which is exact.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open

INDEX_FILE = "model.safetensors.index.json"
_HEADER_LIMIT = 100 << 20  # the safetensors format's own cap on header size


class CheckpointFiles:
    """The tensors of a checkpoint directory, single-file or sharded."""

    def __init__(self, where: dict[str, Path], shapes: dict[str, tuple[int, ...]], dtypes: dict[str, str]) -> None:
        self._where, self._shapes, self._dtypes = where, shapes, dtypes
        self._handles: dict[Path, Any] = {}

    @classmethod
    def open(cls, path: Path) -> "CheckpointFiles":
        files = _shard_files(path)
        where: dict[str, Path] = {}
        shapes: dict[str, tuple[int, ...]] = {}
        dtypes: dict[str, str] = {}
        for file in files:
            try:
                with safe_open(str(file), framework="numpy") as f:
                    for name in f.keys():
                        s = f.get_slice(name)
                        where[name], shapes[name], dtypes[name] = file, tuple(s.get_shape()), s.get_dtype()
            except Exception as e:  # the Rust side raises bare Exceptions for bad files
                raise ValueError(f"{file} is not a readable safetensors file: {e}") from None
        return cls(where, shapes, dtypes)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return self._shapes

    def get(self, name: str) -> np.ndarray:
        file = self._where[name]
        if self._dtypes[name] == "BF16":
            return _read_bf16(file, name, self._shapes[name])
        handle = self._handles.get(file)
        if handle is None:
            handle = self._handles[file] = safe_open(str(file), framework="numpy")
        return handle.get_tensor(name)


def _shard_files(path: Path) -> list[Path]:
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{index} is not a valid index (needs a 'weight_map' object): {e}") from None
        files = sorted({path / str(v) for v in weight_map.values()})
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise ValueError(f"{index} names shard files that do not exist: {', '.join(absent)}")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{path} has no *.safetensors files")
    return files


def _read_bf16(file: Path, name: str, shape: tuple[int, ...]) -> np.ndarray:
    with open(file, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n > _HEADER_LIMIT:
            raise ValueError(f"{file}: safetensors header of {n} bytes exceeds the format's limit")
        begin, end = json.loads(f.read(n))[name]["data_offsets"]
    count = (end - begin) // 2
    if count != int(np.prod(shape)):
        raise ValueError(f"{file}: tensor {name} holds {count} values, its shape {list(shape)} needs {int(np.prod(shape))}")
    raw = np.fromfile(file, dtype="<u2", count=count, offset=8 + n + begin)
    return (raw.astype(np.uint32) << 16).view(np.float32).reshape(shape)
