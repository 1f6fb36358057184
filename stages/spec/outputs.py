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
    from overlapd.stages.output.processor import RequestOutput
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
            if last.logprobs is not None and out.logprobs is not None:
                last.logprobs = last.logprobs + out.logprobs
            last.text_delta += out.text_delta
            last.finish_reason = out.finish_reason
            last.completion_tokens = out.completion_tokens
            continue
        merged.append(out)
        merged_rows.append(row)
    return merged, merged_rows


def ring_columns(merged: list[RequestOutput], rows: list[int], out: StepOutput,
                 k: int) -> dict[str, np.ndarray | None]:
    """tokens [bsz, T, k+1], accept_num, and with k > 0 logprobs and ranks:
    each emitted token's own (its column's), zeros past accept_num (SPEC 1.3)."""
    assert out.spec_tokens is not None
    bsz, t = len(merged), out.spec_tokens.shape[1]
    tokens = np.zeros((bsz, t, k + 1), np.int32)
    accept_num = np.fromiter((len(m.new_token_ids) for m in merged), np.int32, count=bsz)
    for i, m in enumerate(merged):
        tokens[i, : len(m.new_token_ids), 0] = m.new_token_ids
    logprobs = ranks = None
    if k > 0:
        assert out.spec_logprobs is not None and out.spec_ranks is not None and out.spec_top_ids is not None
        idx = np.asarray(rows, np.intp)
        emitted = np.arange(t)[None, :] < accept_num[:, None]  # [bsz, T]
        logprobs = np.where(emitted[:, :, None], out.spec_logprobs[idx, :, : k + 1], 0.0).astype(np.float32)
        ranks = np.where(emitted, out.spec_ranks[idx], 0).astype(np.int32)
        tokens[:, :, 1:] = np.where(emitted[:, :, None], out.spec_top_ids[idx, :, :k], 0)
    return {"tokens": tokens, "accept_num": accept_num, "logprobs": logprobs, "ranks": ranks}
