"""CUDA graphs for decode steps: one per (rows bucket, context bucket), captured on first use.

A decode step launches hundreds of small kernels; on a slow host their launch
costs more than the device work. A captured graph replays them in one call.
Capture needs fixed shapes and fixed addresses, so:
- rows are padded up to a bucket (1, 2, 4, 8, then multiples of 8 up to
  max_num_seqs); padding rows are staged as one-token rows at position 0 whose
  KV writes the runner sends to a spare block (they never sample);
- the attention span is padded up to a bucket of `context_step_blocks` blocks
  (masking keeps the result exact), so a growing context recaptures rarely;
- every input is read from the persistent device buffers (input_batch.py),
  which keep their addresses; the graph's outputs (sampled ids, the ints
  copied to the host) live in the graph's pool at fixed addresses too, and are
  copied out on the stream before the next replay can overwrite them.
A graph also has a sampling variant, part of its key: greedy only (an argmax),
or sampled (temperature, top-p, top-k and seeds for every row, each row's own
parameters read from the persistent per-slot buffers, greedy rows taking the
argmax inside the same graph), each with or without top-k logprobs (always
`logprob_width` candidates: a request's own k is a slice of them on the host
side), and with or without a check of each row's token against its draft
(speculative decoding's verify rows run as one-token rows: stages/spec/verify.py).
So a batch mixing greedy, sampled and logprob rows replays one graph, and an
all-greedy batch keeps the cheaper one. Only steps whose rows are all one-token
decodes are captured; prefill steps run eagerly through the same code.

The capture itself is the runtime's (`Ops.capture_graph`, Torch on CUDA only),
so this bookkeeping runs on the CPU with a fake capture in the tests.
"""

from __future__ import annotations

import bisect
from typing import Any, Callable, Protocol


class CapturedGraph(Protocol):
    output: Any  # what the captured function returned; rewritten in place by replay()

    def replay(self) -> None: ...


CaptureFn = Callable[[Callable[[], Any]], CapturedGraph]

DEFAULT_CONTEXT_STEP_BLOCKS = 8

# (padded rows, padded context blocks, sampled, logprob width, verifies drafts)
GraphKey = tuple[int, int, bool, int, bool]


def logprob_width(num_logprobs: int, max_logprobs: int, vocab_size: int) -> int:
    """Candidates a step computes when its rows ask for up to `num_logprobs`:
    0, or the most any request may ask for (so one graph serves every k; eager
    steps use the same width, so their candidates and ties equal a replay's)."""
    return 0 if num_logprobs <= 0 else min(max_logprobs, vocab_size)


def row_buckets(max_rows: int) -> list[int]:
    """1, 2, 4, 8, 16, 24, 32, ... up to max_rows (always included)."""
    out = [b for b in (1, 2, 4) if b < max_rows]
    out += list(range(8, max_rows, 8))
    return out + [max_rows]


class DecodeGraphs:
    def __init__(self, capture: CaptureFn, max_rows: int, max_blocks: int,
                 context_step_blocks: int = DEFAULT_CONTEXT_STEP_BLOCKS) -> None:
        if context_step_blocks < 1:
            raise ValueError(f"context_step_blocks must be >= 1, got {context_step_blocks}")
        self._capture = capture
        self._rows = row_buckets(max_rows)
        self.max_rows = max_rows
        self.max_blocks = max_blocks
        self.step_blocks = context_step_blocks
        self._graphs: dict[GraphKey, CapturedGraph] = {}
        self.captures = 0
        self.replays = 0

    def key(self, num_rows: int, max_seq_len: int, block_size: int, sampled: bool = False,
            logprobs: int = 0, verify: bool = False) -> GraphKey:
        """(padded rows, padded context blocks, sampled, logprob width, verify) for a decode step."""
        if not 1 <= num_rows <= self.max_rows:
            raise ValueError(f"num_rows must lie in [1, {self.max_rows}], got {num_rows}")
        rows = self._rows[bisect.bisect_left(self._rows, num_rows)]
        need = -(-max_seq_len // block_size)
        blocks = min(-(-need // self.step_blocks) * self.step_blocks, self.max_blocks)
        return rows, blocks, sampled, logprobs, verify

    def run(self, key: GraphKey, body: Callable[[], Any]) -> Any:
        """Replay the graph for `key` (capturing `body` first if new); returns its outputs."""
        g = self._graphs.get(key)
        if g is None:
            g = self._graphs[key] = self._capture(body)
            self.captures += 1
        g.replay()
        self.replays += 1
        return g.output

    def __len__(self) -> int:
        return len(self._graphs)


__all__ = ["CapturedGraph", "DecodeGraphs", "GraphKey", "logprob_width", "row_buckets"]
