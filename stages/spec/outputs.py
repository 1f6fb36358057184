"""A speculative step's outputs: one frame and one ring row per request.

A verify row emits several tokens in one step. The output processor turns
each into a RequestOutput (detokenizing and checking stop strings token by
token); here consecutive outputs of one request are merged into one (one
`tokens` frame with the tokens in order), and the ring row carries them as
its accept_num columns (SPEC 1.3: flag 2, T = k + 1 for the whole step).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from overlapd.stages.output_processor import RequestOutput
    from overlapd.stages.step_types import StepOutput


def merge(outputs: list[RequestOutput], rows: list[int]) -> tuple[list[RequestOutput], list[int]]:
    """Consecutive outputs of one request (one verify row) become one; `rows`
    gives each output's step row and comes back one per merged output."""
    merged: list[RequestOutput] = []
    merged_rows: list[int] = []
    for out, row in zip(outputs, rows, strict=True):
        if merged and merged_rows[-1] == row:
            last = merged[-1]
            last.new_token_ids = last.new_token_ids + out.new_token_ids
            last.text_delta += out.text_delta
            last.finish_reason = out.finish_reason
            last.completion_tokens = out.completion_tokens
            continue
        merged.append(out)
        merged_rows.append(row)
    return merged, merged_rows


def ring_columns(merged: list[RequestOutput], rows: list[int], drafted: np.ndarray, out: StepOutput,
                 k: int) -> dict[str, np.ndarray | None]:
    """tokens [bsz, T, k+1], accept_num, and with k > 0 logprobs and ranks;
    `drafted` (bool [bsz]) marks the verify rows.

    Logprobs exist for plain rows only (logprob requests do not speculate in
    this slice): in a step that carries logprobs for other rows, a verify
    row's emitted columns hold NaN logprobs, rank 0 and candidate ids 0, and
    its columns past accept_num zeros, as every row's do (SPEC 1.3)."""
    assert out.spec_tokens is not None
    bsz, t = len(merged), out.spec_tokens.shape[1]
    tokens = np.zeros((bsz, t, k + 1), np.int32)
    accept_num = np.fromiter((len(m.new_token_ids) for m in merged), np.int32, count=bsz)
    for i, m in enumerate(merged):
        tokens[i, : len(m.new_token_ids), 0] = m.new_token_ids
    logprobs = ranks = None
    if k > 0:
        assert out.logprobs is not None and out.ranks is not None and out.top_ids is not None
        idx = np.asarray(rows, np.intp)
        plain = ~drafted
        logprobs = np.zeros((bsz, t, k + 1), np.float32)
        ranks = np.zeros((bsz, t), np.int32)
        logprobs[:, 0] = np.where(plain[:, None], out.logprobs[idx, : k + 1], 0.0)
        for i in np.flatnonzero(drafted):  # every emitted column of a verify row: unknown, not zero
            logprobs[i, : accept_num[i]] = np.nan
        ranks[:, 0] = np.where(plain, out.ranks[idx], 0)
        tokens[:, 0, 1:] = np.where(plain[:, None], out.top_ids[idx, :k], 0)
    return {"tokens": tokens, "accept_num": accept_num, "logprobs": logprobs, "ranks": ranks}
