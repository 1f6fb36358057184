"""kernels/triton_sampling.py's sampling rule in numpy, for the interpreter check
(triton_kernels_check.py) and tests/gpu. Imports neither torch nor Triton."""

from __future__ import annotations

import numpy as np


def _order_key(x: np.ndarray, shift: int) -> np.ndarray:
    b = x.astype(np.float32).view(np.int32).astype(np.int64)
    return np.where(b < 0, b ^ 0x7FFFFFFF, b) >> shift


def kept_mask(x: np.ndarray, t: float, top_p: float, top_k: int, shift: int) -> np.ndarray:
    """Tokens kept by kernels/triton_sampling.py's rule, in numpy (masses in
    float64): a token's key group has mass < top_p and fewer than top_k tokens
    above it."""
    vocab = x.shape[0]
    xs = (x.astype(np.float32) / np.float32(t)).astype(np.float64)
    p = np.exp(xs - xs.max())
    p /= p.sum()
    key = _order_key(x, shift)
    order = np.argsort(-key, kind="stable")
    ks = -key[order]
    start = np.searchsorted(ks, ks, side="left")  # first position of each token's key group
    mass_above = np.concatenate([[0.0], np.cumsum(p[order])])[start]
    k = min(int(top_k), vocab) if top_k > 0 else vocab
    kept = np.zeros(vocab, bool)
    kept[order] = (mass_above < top_p) & (start < k)
    return kept


def race_reference(logits, temperature, top_p, top_k, state, shift: int) -> np.ndarray:
    """kernels/triton_sampling.py's definition in numpy: the kept token with the
    largest logit / t + Gumbel noise from race_uniform."""
    from overlapd.kernels.triton_sampling import race_uniform

    rows, vocab = logits.shape
    out = []
    for r in range(rows):
        t = np.float32(temperature[r] if temperature[r] > 0 else 1.0)
        x = logits[r].astype(np.float32)
        kept = kept_mask(x, float(t), float(top_p[r]), int(top_k[r]), shift)
        u = race_uniform(np.full(vocab, state[r]), np.arange(vocab))
        out.append(int(np.argmax(np.where(kept, x / t - np.log(-np.log(u)), -np.inf))))
    return np.asarray(out)
