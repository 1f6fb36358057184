"""The model and runtime options the engine benches share, and the
EngineConfig fields they set (bench scripts run as `python bench/X.py`, so
this folder is on their import path)."""

from __future__ import annotations

import argparse


def add_model_args(ap: argparse.ArgumentParser, *, model: str = "tiny", runtime: str = "paddle",
                   dtype: str = "float32") -> None:
    """--model, --load-format, --runtime, --device, --dtype ("" : the engine's default for the device)."""
    ap.add_argument("--model", default=model, help="a model name, a checkpoint or GGUF path, or a shape name")
    ap.add_argument("--load-format", default="auto", help="auto, or dummy (random weights of the model's shape)")
    ap.add_argument("--runtime", default=runtime, help="paddle or torch")
    ap.add_argument("--device", default="cpu", help="cpu or gpu")
    ap.add_argument("--dtype", default=dtype, help="model dtype (empty: the engine's default for the device)")


def model_fields(args: argparse.Namespace) -> dict[str, str]:
    """EngineConfig keyword arguments for the options above."""
    fields = {"model": args.model, "load_format": args.load_format, "runtime": args.runtime, "device": args.device}
    if args.dtype:
        fields["dtype"] = args.dtype
    return fields
