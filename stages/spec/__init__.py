"""Speculative decoding (issue 12): proposals, verification, accounting.

The rest of the engine calls in through small hooks:
- the scheduler asks `SpecPlanner` which rows speculate and with which drafts,
  and hands it each verify row's accept count (`planner.py`);
- the model runner stages a step's verify positions (`verify.stage`) and runs
  `Verifier.logits_and_verify` on the step's hidden states (`verify.py`);
- the output processor merges a verify row's outputs and packs the step's
  ring rows (`outputs.py`).

Proposals for greedy rows without logprobs (everything else decodes plainly
beside them): `ngram` (prompt lookup, on the host: `ngram.py`) or `draft` (a
draft network run on the device inside the step: `draft_model.py` builds it,
`draft_plan.py` plans its work on the host, `drafter.py` runs it at launch).
"""

from .config import SPEC_METHODS, SpecConfig
from .planner import SpecPlanner
from .stats import SpecStats

__all__ = ["SPEC_METHODS", "SpecConfig", "SpecPlanner", "SpecStats"]
