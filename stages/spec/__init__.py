"""Speculative decoding (issue 12): proposals, verification, accounting.

The rest of the engine calls in through small hooks:
- the scheduler asks `SpecPlanner` which rows speculate and with which drafts,
  and hands it each verify row's accept count (`planner.py`);
- the model runner stages a step's verify positions (`verify.stage`) and runs
  `Verifier.verify` on the step's hidden states (`verify.py`);
- the output processor packs a speculative step's ring rows (`ring_rows.py`).

This slice: `ngram` (prompt lookup) proposals for greedy rows without
logprobs; everything else decodes plainly beside them.
"""

from .config import SPEC_METHODS, SpecConfig
from .planner import SpecPlanner
from .stats import SpecStats

__all__ = ["SPEC_METHODS", "SpecConfig", "SpecPlanner", "SpecStats"]
