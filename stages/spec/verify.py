"""Verification of a step's drafts: what the device computes per token, and
what the host makes of it.

A verify row [t, d1..dk] runs as k + 1 one-token step rows (the stager spreads
it: stages/runner/step_stager.py). Column j is an ordinary decode row at position
start + j on the request's slot that samples the request's output
`output_index + j` with its parameters and the seed state of that output;
the device also marks whether it drew d(j+1), the draft that follows it.
The row emits the drafts up to the first column that drew something else,
then that column's token: accept_num = leading matches + 1.

Why this is rejection sampling. The drafts are deterministic (prompt lookup,
or a draft model's argmax): the draft distribution q is a point mass on d.
The speculative-sampling rule then accepts d with probability
min(1, p(d) / q(d)) = p(d) and, on rejection, draws from the residual
max(0, p - q), which is p without d, renormalised. Drawing x from p with the
row's uniform and accepting d exactly when x = d does both at once: x = d has
probability p(d), and a rejected x is distributed as p given x != d. Every
emitted token is therefore what non-speculative decoding would have drawn
with the same seed state, so a seeded request gives the same tokens with or
without speculation, alone or in a crowd, whatever drafts it was offered;
greedy rows (an argmax) are the special case. One device rule serves greedy,
sampled and logprob rows, and each emitted token's logprobs are its column's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(slots=True)
class Verified:
    """A verify step's outputs by scheduled row and token column (T columns)."""

    accept_num: np.ndarray  # i32 [R]: tokens each row emits (1 for plain rows)
    tokens: np.ndarray  # i32 [R, T]: the sampled token of every column (the first accept_num are emitted)
    sampled: np.ndarray  # i32 [R]: column 0's token (a plain row's only one)
    finish: np.ndarray  # i32 [R]: column 0's device stop verdict (verify rows' tokens are checked on the host)
    logprobs: np.ndarray | None  # f32 [R, T, k + 1]
    top_ids: np.ndarray | None  # i32 [R, T, k]
    ranks: np.ndarray | None  # i32 [R, T]


def contract(ints: np.ndarray, logprobs: np.ndarray | None, spec_rows: np.ndarray, k: int) -> Verified:
    """Fold a verify step's per-token step rows back into its scheduled rows.

    `ints` is the step's int64 [step rows, C] output block (sampled id, stop
    verdict, then with logprobs the rank and k candidate ids, and last a 1
    where the row drew its draft); `spec_rows` int64 [R, T] maps each
    scheduled row's column to its step row (-1: none)."""
    exists = spec_rows >= 0
    at = np.where(exists, spec_rows, 0)
    drew_draft = (ints[at, -1] == 1) & exists
    # a column counts only after unbroken matches; the last column has no draft to match
    leading = np.cumprod(drew_draft, axis=1).sum(axis=1)
    tokens = np.where(exists, ints[at, 0], 0).astype(np.int32)
    first = spec_rows[:, 0]
    out = Verified(
        accept_num=(leading + 1).astype(np.int32),
        tokens=tokens,
        sampled=tokens[:, 0].copy(),
        finish=ints[first, 1].astype(np.int32),
        logprobs=None, top_ids=None, ranks=None,
    )
    if k and logprobs is not None:
        out.logprobs = np.where(exists[:, :, None], logprobs[at, : k + 1], 0.0).astype(np.float32)
        out.ranks = np.where(exists, ints[at, 2], 0).astype(np.int32)
        out.top_ids = np.where(exists[:, :, None], ints[at, 3: 3 + k], 0).astype(np.int32)
    return out
