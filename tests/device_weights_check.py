"""Dummy weights drawn by the runtime's generator (loader.device_random_params)
on the Torch CPU runtime; prints one JSON line. Run by test_model_loader.py in
a subprocess, so torch and paddle never share a process."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
from overlapd.stages.model.config import NAMED_SHAPES
from overlapd.stages.model.llama import LlamaModel, param_layout
from overlapd.stages.model.loader import device_random_params
from overlapd.stages.runtime import load_runtime


def main() -> None:
    ops = load_runtime("torch", "cpu")
    # the 8B shape, shrunk: untied head, GQA, llama3 RoPE as the real one
    config = replace(NAMED_SHAPES["llama-3.1-8b"], hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                     num_attention_heads=8, num_key_value_heads=2, head_dim=32, vocab_size=128256)
    a = device_random_params(config, ops, 5, "bfloat16")
    b = device_random_params(config, ops, 5, "bfloat16")
    c = device_random_params(config, ops, 6, "bfloat16")
    shapes_ok = all(tuple(a[n].shape) == (sum(s[0] for _, s in src), *src[0][1][1:])
                    for n, src in param_layout(config).items())
    arr = {n: ops.to_numpy(t).astype(np.float64) for n, t in a.items()}
    head = arr["lm_head"]
    specials = [config.bos_token_id, *config.eos_token_ids]
    model = LlamaModel(config, ops, a, 256)
    print(json.dumps({
        "dtype": ops.dtype_of(a["lm_head"]),
        "shapes_ok": shapes_ok,
        "same_seed_same": all(bool((ops.to_numpy(a[n]) == ops.to_numpy(b[n])).all()) for n in a),
        "other_seed_differs": not bool((ops.to_numpy(a["layers.0.qkv_proj"]) == ops.to_numpy(c["layers.0.qkv_proj"])).all()),
        "norm_mean": float(arr["layers.1.input_layernorm"].mean()), "norm_std": float(arr["layers.1.input_layernorm"].std()),
        "qkv_std_x_sqrt_fan_in": float(arr["layers.0.qkv_proj"].std() * math.sqrt(256)),
        "down_std_x_sqrt_fan_in": float(arr["layers.0.down_proj"].std() * math.sqrt(512)),
        "embed_std": float(arr["embed_tokens"].std()),
        "head_std_x_sqrt_h": float(np.delete(head, specials, axis=0).std() * math.sqrt(256)),
        "special_rows_zero": bool((head[specials] == 0).all()),
        "layers": len(model.layers),
    }))


if __name__ == "__main__":
    main()
