"""kernels/triton_sampling.py's sampling rule in numpy, for the interpreter check
(triton_kernels_check.py) and tests/gpu; masses in float64. The uniforms come
from the kernel module's host mirror."""

from __future__ import annotations

import numpy as np


def _order_key(x: np.ndarray, shift: int) -> np.ndarray:
    b = x.astype(np.float32).view(np.int32).astype(np.int64)
    return np.where(b < 0, b ^ 0x7FFFFFFF, b) >> shift


def kept_mask(x: np.ndarray, t: float, top_p: float, top_k: int, shift: int) -> np.ndarray:
    """Tokens kept by kernels/triton_sampling.py's rule, in numpy (masses in
    float64): a token's key group has mass < top_p (top_p 1: any) and fewer
    than top_k tokens above it."""
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
    kept[order] = ((mass_above < top_p) | (top_p >= 1)) & (start < k)  # top_p 1: off
    return kept


def _inverse_cdf(p: np.ndarray, cand: np.ndarray, u: float) -> tuple[int, bool]:
    """The first candidate whose running mass (vocabulary order) passes u * total,
    and whether float32 rounding could have moved it (an end of its interval within 1e-5)."""
    q = np.where(cand, p, 0.0)
    cs = np.cumsum(q)
    target = float(u) * cs[-1]
    hit = np.nonzero(cand & (cs > target))[0]
    j = int(hit[0]) if hit.size else int(np.nonzero(cand)[0][-1])
    # rounding moves the pick only where the target lies near an end of j's interval
    return j, bool(min(abs(cs[j] - target), abs(cs[j] - q[j] - target)) < 1e-5 * cs[-1])


def draw_reference(logits, temperature, top_p, top_k, state, shift: int):
    """kernels/triton_sampling.py's definition in numpy, masses in float64:
    (tokens, deciding rounds, rows whose draw float32 rounding could change)."""
    from overlapd.kernels.triton_sampling import GREEDY, ROUNDS, uniform

    rows, vocab = logits.shape
    tokens, rounds, ambiguous = [], [], []
    for r in range(rows):
        x = logits[r].astype(np.float32)
        if temperature[r] <= 0:
            tokens.append(int(np.argmax(x)))
            rounds.append(GREEDY)
            ambiguous.append(False)
            continue
        t = np.float32(temperature[r])
        xs = (x / t).astype(np.float64)
        p = np.exp(xs - xs.max())
        p /= p.sum()
        kept = kept_mask(x, float(t), float(top_p[r]), int(top_k[r]), shift)
        key = _order_key(x, shift)
        cand = np.ones(vocab, bool)
        amb = False
        for rnd in range(1, ROUNDS + 2):
            u = uniform(np.array([state[r]]), np.array([rnd]))[0]
            if rnd > ROUNDS:  # the fallback: one draw from the kept set
                j, a = _inverse_cdf(p, kept, u)
                amb |= a
                break
            j, a = _inverse_cdf(p, cand, u)
            amb |= a
            above = p[key > key[j]].sum()
            amb |= top_p[r] < 1 and abs(above - top_p[r]) < 1e-5
            if kept[j]:
                break
            cand = key > key[j]
        tokens.append(j)
        rounds.append(rnd)
        ambiguous.append(amb)
    return np.asarray(tokens), np.asarray(rounds), np.asarray(ambiguous)
