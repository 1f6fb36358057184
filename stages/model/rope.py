"""Rotary position embedding tables, computed once on the host in float64."""

from __future__ import annotations

import math

import numpy as np

from .config import LlamaConfig, RopeScaling


def inverse_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None) -> np.ndarray:
    """[head_dim // 2] rotation speeds, with Llama 3's scaling when configured.

    Llama 3 keeps high frequencies (short wavelengths), divides low ones by
    `factor`, and blends smoothly in between; this is the formula of the
    reference implementation (HF `_compute_llama3_parameters`).
    """
    inv = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if scaling is None:
        return inv
    old_len = scaling.original_max_position_embeddings
    low_wavelen = old_len / scaling.low_freq_factor
    high_wavelen = old_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / scaling.factor, inv)
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    blended = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, blended, scaled)


def cos_sin_tables(config: LlamaConfig, max_positions: int) -> tuple[np.ndarray, np.ndarray]:
    """float32 [max_positions, head_dim // 2] cos and sin tables."""
    inv = inverse_frequencies(config.head_dim, config.rope_theta, config.rope_scaling)
    angles = np.arange(max_positions, dtype=np.float64)[:, None] * inv[None, :]
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
