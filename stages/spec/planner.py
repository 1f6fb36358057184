"""The scheduler's side of speculative decoding: who speculates, with which
drafts, and what the host keeps of a verify row once its accept count is known.

A verify row is [last known token, d1..dk] at the request's next positions,
with KV slots for all k+1. The token the target draws after each of those
positions (its argmax, or a seeded sample) decides how many drafts are
accepted (`verify.py`); the row then emits the accepted drafts and the
target's next token, and the host trims its view back: the KV positions of rejected drafts
are forgotten (the next step overwrites them) and blocks that only they used
go back to the pool.

Overlap: the host plans a speculating request's next row while its previous
row is still in flight, as if that row accepts every draft (a chain): the
host plans with the worst case, the device holds the truth (DESIGN.md). The
chained row is staged after those drafts, with KV room for them, and carries
drafts proposed from the known tokens plus the assumed ones. On the device,
the verify row leaves its slot a lag (the columns it did not emit), and the
chained row moves back by it before it runs: its positions, lengths and
output indices, and its first token is the verify row's last emitted one
(input_batch.py `apply_lag`); its seed states already follow the accept
counts. So a chained row is never void: if its predecessor rejected a
draft, it still computes the request's next tokens, at the right positions;
its own drafts were proposed for another context and are then likely
rejected, which costs nothing but their columns. When the accept count
reaches the host, it trims its view (positions and the blocks only rejected
drafts used) and remembers the lag to read the chained row's output at its
real index. Whatever drafts a row carries, verification keeps exactly the
tokens plain decoding would draw (verify.py), so overlap and --no-overlap
(which never chains: nothing is in flight when it plans) emit the same
tokens. A chain is one row deep: a request waits while two of its rows are
in flight, when its row in flight is not from the step just before (the
device's copy of its last token is gone), and when that row was itself
chained on a row that missed (its drafts were made for another context).
"""

from __future__ import annotations

from dataclasses import dataclass

from overlapd.stages.kv.block_manager import BlockManager
from overlapd.stages.request import Request, RequestStatus
from overlapd.stages.step_types import ScheduledRow

from .config import SpecConfig
from .draft_plan import DraftPlanner
from .ngram import TokenHistory, propose_ngram
from .stats import SpecStats

# The draft method's verify rows carry these in place of drafts: the drafter
# writes the real ones into the step's inputs on the device (drafter.py).
DRAFT_PLACEHOLDER = 0


@dataclass(slots=True)
class _InFlight:
    """A speculating request's newest row that samples."""

    step_id: int
    drafts: list[int]  # what it emits, but its last token, if it accepts every draft


@dataclass(slots=True)
class _Chain:
    """A row planned on the assumption that the row of `assumed_step` accepts every draft."""

    assumed_step: int
    full: int  # the tokens that row emits then: drafts + 1
    step_id: int


class SpecPlanner:
    def __init__(self, cfg: SpecConfig, max_num_batched_tokens: int = 0) -> None:
        self.cfg = cfg
        self.stats = SpecStats()
        self._in_flight: dict[int, _InFlight] = {}
        self._chains: dict[int, _Chain] = {}  # by request: chains whose assumption is not settled yet
        # request -> (step id of its chained row, outputs it starts before its planned index)
        self._lags: dict[int, tuple[int, int]] = {}
        self._missed: set[int] = set()  # requests whose last settled verify row rejected a draft
        self._histories: dict[int, TokenHistory] = {}  # the ngram method's known tokens, by request
        self._paused = False  # this step drafts nothing (speculative_max_batch)
        # the draft method's chunks and draft KV bookkeeping (draft_plan.py)
        self.draft: DraftPlanner | None = None
        if cfg.method == "draft":
            if max_num_batched_tokens < 1:
                raise ValueError("the draft method needs the step's token budget (max_num_batched_tokens)")
            self.draft = DraftPlanner(cfg.self_draft, max_num_batched_tokens)

    def begin_step(self, running: list[Request]) -> None:
        """A new schedule() starts with `running`: per-step budgets start over,
        and the step drafts nothing if they are more than max_batch."""
        self._paused = 0 < self.cfg.max_batch < len(running)
        if self._paused and any(self.speculates(req) for req in running):
            self.stats.paused_steps += 1
        if self.draft is not None:
            self.draft.begin_step()

    def speculates(self, req: Request) -> bool:
        """Every request that did not turn speculation off: greedy, sampled
        and logprob rows verify by the same rule (verify.py)."""
        return req.params.speculative

    def waits(self, req: Request) -> bool:
        """True while a speculating request's last output is in flight: its next
        row can only be a chained one (`chain`)."""
        return req.num_placeholders > 0 and self.speculates(req)

    def chain(self, req: Request, step_id: int, room: int, positions_left: int) -> tuple[list[int], int] | None:
        """(drafts, output index) for a row chained on the request's row in
        flight (the overlap rule above), or None: it waits. `room` is the step's
        spare token budget, `positions_left` the context left after the chained
        row's first position."""
        if self.draft is not None:
            return None  # a draft chunk needs every token known: the draft method does not chain
        last = self._in_flight.get(req.req_id)
        if (last is None or last.step_id != step_id - 1 or req.num_placeholders != 1
                or req.req_id in self._chains or positions_left < 0):
            return None
        if last.drafts and req.req_id in self._missed and not self._paused:
            # its last settled verify row missed, so the row in flight (chained on
            # it) carries drafts made for another context: guessing past it loses
            # more acceptance than the host's round trip costs (H200, SmolLM2:
            # 1.57-1.61x chaining here, 1.82-1.94x waiting), so it plans from the truth;
            # a paused step proposes nothing to lose, so it chains
            return None
        limit = req.stops.max_outputs if req.stops is not None else req.params.max_tokens
        outputs = len(req.output_token_ids) + len(last.drafts) + 1  # if the row in flight keeps every draft
        if outputs >= limit:
            return None  # it may end the request: no row after it
        k = min(self.cfg.num_tokens, room, limit - outputs - 1, positions_left)
        if k < 1 or self._paused:
            return [], outputs
        known = self._history(req).tokens(req.output_token_ids, last.drafts)
        # the first proposal guesses the in-flight row's last token (the device has it); the rest are drafts
        return propose_ngram(known, k + 1, self.cfg.ngram_max, self.cfg.ngram_min)[1:], outputs

    def planned(self, req: Request, row: ScheduledRow, step_id: int) -> None:
        """A row of a speculating request that samples was made (chained or not,
        after drafts() and the KV allocation)."""
        if self.draft is not None and row.num_tokens - row.num_drafts == 1:  # a decode row: its draft chunk
            self.draft.plan(req, row)
        last = self._in_flight.get(req.req_id)
        if row.from_prev_step and last is not None and last.drafts:  # an assumption that can fail
            self._chains[req.req_id] = _Chain(last.step_id, len(last.drafts) + 1, step_id)
        self._in_flight[req.req_id] = _InFlight(step_id, row.token_ids[row.num_tokens - row.num_drafts:])
        if row.from_prev_step:
            self.stats.chained_rows += 1

    def output_lag(self, req: Request, step_id: int) -> int:
        """How many outputs before its planned output_index the row of `step_id`
        starts (its predecessor rejected that many drafts; 0 for any other row)."""
        lag = self._lags.get(req.req_id)
        if lag is None or lag[0] != step_id:
            return 0
        del self._lags[req.req_id]
        return lag[1]

    def forget(self, req_id: int) -> None:
        """The request finished: outputs still in flight are dropped anyway."""
        self._in_flight.pop(req_id, None)
        self._chains.pop(req_id, None)
        self._lags.pop(req_id, None)
        self._missed.discard(req_id)
        self._histories.pop(req_id, None)

    def drafts(self, req: Request, room: int) -> list[int]:
        """Drafts for the request's next verify row, at most `room` (the step's
        spare token budget). The row emits up to drafts + 1 tokens, so drafts stop
        one short of the request's output limit."""
        if room < 1 or self._paused or not self.speculates(req):
            return []
        limit = req.stops.max_outputs if req.stops is not None else req.params.max_tokens
        k = min(self.cfg.num_tokens, room, limit - req.num_outputs - 1)
        if k < 1:
            return []
        if self.draft is not None:  # drafted on the device, if the draft's catch-up fits this step
            return [DRAFT_PLACEHOLDER] * k if self.draft.fits(req) else []
        known = self._history(req).tokens(req.output_token_ids)
        return propose_ngram(known, k, self.cfg.ngram_max, self.cfg.ngram_min)

    def _history(self, req: Request) -> TokenHistory:
        history = self._histories.get(req.req_id)
        if history is None:
            history = self._histories[req.req_id] = TokenHistory(req.prompt_token_ids)
        return history

    def verified(self, req: Request, row: ScheduledRow, step_id: int, accept_num: int, emitted: int,
                 bm: BlockManager) -> None:
        """A verify row's outcome reached the host: `accept_num` tokens (accepted
        drafts + 1) of which `emitted` were kept after stop conditions. A row
        chained on it ran `rejected` positions and outputs earlier than planned
        (the device moved it back)."""
        accepted = accept_num - 1
        self.stats.record(row.num_drafts, accepted, emitted)
        if self.draft is not None:
            self.draft.verified(req, row, accepted)
        rejected = row.num_drafts - accepted
        if rejected > 0:
            self._missed.add(req.req_id)
        else:
            self._missed.discard(req.req_id)
        chain = self._chains.get(req.req_id)
        if chain is not None and chain.assumed_step == step_id:
            del self._chains[req.req_id]
            if accept_num < chain.full:
                self._lags[req.req_id] = (chain.step_id, chain.full - accept_num)
                self.stats.lagged_rows += 1
        # A preempted or finished request already gave back its positions and blocks.
        if rejected <= 0 or req.status is not RequestStatus.RUNNING:
            return
        req.num_computed_tokens -= rejected
        keep = bm.blocks_for_tokens(req.num_computed_tokens)
        if len(req.block_ids) > keep:
            bm.free(req.block_ids[keep:])
            del req.block_ids[keep:]  # in place: rows handed out hold their own snapshots
