"""The host's side of the draft method: what the draft network computes in each step.

Drafts are made on the device inside the step (drafter.py); the host only
plans. A verify row is planned as for ngram (its last known token, then k
placeholder drafts, KV slots for all k + 1; the overlap rule unchanged), and
carries a draft chunk: the known tokens from the first position whose
draft-model KV is missing up to and including the row's last known token.
The draft's forward over the chunk gives d1 (the argmax at its last
position); k - 1 one-token forwards, each fed the previous argmax, give
d2..dk.

Per request, `num_draft_computed` says how far the draft model's KV is valid:
- a verify row at position s with d drafts, a of them accepted: the draft
  wrote positions s..s+d-1 from [t, d1..d_{d-1}], and those holding accepted
  tokens stay valid, so it becomes s + 1 + min(a, d - 1);
- releasing a request's KV (preemption, finishing) sets it to 0; a request
  that re-enters with a prefix-cache hit has the target's KV for the prefix,
  not the draft's, so its draft catches up over the whole prefix.
The self-draft shares the target's KV (the target computes those layers for
every token): it is always caught up and its chunk is the last known token.

The catch-up is bounded per step: the draft's chunks take at most
`max_num_batched_tokens` tokens in one step, in the order rows are planned
(the draft's buffers have that size, and a step costs at most one draft
forward of the target's own budget besides the k - 1 one-token passes). A
row drafts only when its whole chunk fits what is left; otherwise it decodes
plainly and its draft catches up as far as fits, so a prompt longer than the
budget (or one found in the prefix cache) takes that many steps of catch-up
before its request drafts.
"""

from __future__ import annotations

from overlapd.stages.request import Request, RequestStatus
from overlapd.stages.step_types import ScheduledRow


class DraftPlanner:
    def __init__(self, shares_target_kv: bool, max_chunk_tokens: int) -> None:
        self.shares_target_kv = shares_target_kv
        self.max_chunk_tokens = max_chunk_tokens
        self._left = max_chunk_tokens  # chunk tokens this step can still take

    def begin_step(self) -> None:
        self._left = self.max_chunk_tokens

    def fits(self, req: Request) -> bool:
        """Whether the request's next row (at its num_computed_tokens) may draft:
        its whole catch-up chunk fits this step's draft budget."""
        s = req.num_computed_tokens
        return s + 1 - self._chunk_start(req, s) <= self._left

    def plan(self, req: Request, row: ScheduledRow) -> None:
        """Attach the draft chunk of a speculating request's decode row (its
        verify row, or a plain row that only catches up) and account for it."""
        s = row.start_pos
        start = self._chunk_start(req, s)
        if row.num_drafts:
            # every token up to s is known: a speculating request waits for its outputs
            tokens = req.token_ids_slice(start, s) + row.token_ids[:1]
        elif self.shares_target_kv:
            return  # nothing to catch up
        else:
            tokens = req.token_ids_slice(start, start + min(s + 1 - start, self._left))
            if not tokens:
                return
        if start > s or len(tokens) > self._left or -1 in tokens:
            raise RuntimeError(f"{req}: draft chunk of {len(tokens)} tokens from position {start} "
                               f"({self._left} left this step, or a token still in flight)")
        self._left -= len(tokens)
        if not self.shares_target_kv:
            req.num_draft_computed = start + len(tokens)
        row.draft_chunk = (start, tokens)

    def verified(self, req: Request, row: ScheduledRow, accepted: int) -> None:
        """A verify row's outcome: the draft's KV stays valid where it holds accepted tokens."""
        if self.shares_target_kv or row.draft_chunk is None or not row.num_drafts:
            return
        if req.status is not RequestStatus.RUNNING:
            return  # its KV was released, the draft's count with it
        req.num_draft_computed = row.start_pos + 1 + min(accepted, row.num_drafts - 1)

    def _chunk_start(self, req: Request, s: int) -> int:
        return s if self.shares_target_kv else req.num_draft_computed
