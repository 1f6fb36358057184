"""The scheduler's side of speculative decoding: who speculates, with which
drafts, and what the host keeps of a verify row once its accept count is known.

A verify row is a small prefill chunk: [last known token, d1..dk] at the
request's next positions, with KV slots for all k+1. The target's greedy
token after each of those positions decides how many drafts are accepted
(`verify.py`); the row then emits the accepted drafts and the target's next
token, and the host trims its view back: the KV positions of rejected drafts
are forgotten (the next step overwrites them) and blocks that only they used
go back to the pool.

Overlap rule (this slice): a speculating request is planned only when none of
its outputs is in flight, so its drafts always follow a sequence the host
knows. Other rows keep overlapping (their next input comes from the device as
before); a speculating row sits out the steps launched while its verify step
is in flight. The step after that verify step is still planned on host facts
only, so overlap and --no-overlap make the same decisions and emit the same
tokens. DESIGN.md's device-side rule (the next step's inputs follow the
device's accept counts, the host plans with worst cases) is the follow-up that
lets such a row overlap too.
"""

from __future__ import annotations

from overlapd.stages.kv.block_manager import BlockManager
from overlapd.stages.request import Request, RequestStatus
from overlapd.stages.step_types import ScheduledRow

from .config import SpecConfig
from .draft_plan import DraftPlanner
from .ngram import propose_ngram
from .stats import SpecStats

# The draft method's verify rows carry these in place of drafts: the drafter
# writes the real ones into the step's inputs on the device (drafter.py).
DRAFT_PLACEHOLDER = 0


class SpecPlanner:
    def __init__(self, cfg: SpecConfig, max_num_batched_tokens: int = 0) -> None:
        self.cfg = cfg
        self.stats = SpecStats()
        # the draft method's chunks and draft KV bookkeeping (draft_plan.py)
        self.draft: DraftPlanner | None = None
        if cfg.method == "draft":
            if max_num_batched_tokens < 1:
                raise ValueError("the draft method needs the step's token budget (max_num_batched_tokens)")
            self.draft = DraftPlanner(cfg.self_draft, max_num_batched_tokens)

    def begin_step(self) -> None:
        """A new schedule() starts: per-step budgets start over."""
        if self.draft is not None:
            self.draft.begin_step()

    def speculates(self, req: Request) -> bool:
        """Greedy requests without logprobs that did not turn speculation off.
        Sampled rows would need rejection sampling, logprob rows per-draft
        candidates: both decode plainly in this slice."""
        p = req.params
        return p.speculative and p.temperature == 0 and p.logprobs == 0

    def waits(self, req: Request) -> bool:
        """True while a speculating request's last output is in flight: its next
        row is planned once the host knows that output (the overlap rule above)."""
        return req.num_placeholders > 0 and self.speculates(req)

    def drafts(self, req: Request, room: int) -> list[int]:
        """Drafts for the request's next verify row, at most `room` (the step's
        spare token budget). The row emits up to drafts + 1 tokens, so drafts stop
        one short of the request's output limit."""
        if room < 1 or not self.speculates(req):
            return []
        limit = req.stops.max_outputs if req.stops is not None else req.params.max_tokens
        k = min(self.cfg.num_tokens, room, limit - req.num_outputs - 1)
        if k < 1:
            return []
        if self.draft is not None:  # drafted on the device, if the draft's catch-up fits this step
            return [DRAFT_PLACEHOLDER] * k if self.draft.fits(req) else []
        return propose_ngram(req.prompt_token_ids + req.output_token_ids, k, self.cfg.ngram_max, self.cfg.ngram_min)

    def planned(self, req: Request, row: ScheduledRow) -> None:
        """A decode row was made for `req` (after drafts() and the KV allocation)."""
        if self.draft is not None and self.speculates(req):
            self.draft.plan(req, row)

    def verified(self, req: Request, row: ScheduledRow, accept_num: int, emitted: int, bm: BlockManager) -> None:
        """A verify row's outcome reached the host: `accept_num` tokens (accepted
        drafts + 1) of which `emitted` were kept after stop conditions."""
        accepted = accept_num - 1
        self.stats.record(row.num_drafts, accepted, emitted)
        if self.draft is not None:
            self.draft.verified(req, row, accepted)
        rejected = row.num_drafts - accepted
        # A preempted or finished request already gave back its positions and blocks.
        if rejected <= 0 or req.status is not RequestStatus.RUNNING:
            return
        req.num_computed_tokens -= rejected
        keep = bm.blocks_for_tokens(req.num_computed_tokens)
        if len(req.block_ids) > keep:
            bm.free(req.block_ids[keep:])
            del req.block_ids[keep:]  # in place: rows handed out hold their own snapshots
