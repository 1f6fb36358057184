"""The data that crosses stage boundaries within one engine step.

The scheduler (preprocess side) produces a `SchedulerOutput`; the model runner
(execute side) turns it into a `StepOutput`; the output processor
(postprocess side) turns that into per-request results. Nothing here knows
the framework: host data is plain Python or numpy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum

import msgspec
import numpy as np

# The largest number of top-k logprob candidates a request may ask for
# (SPEC 2.2: `logprobs` int 0..20).
MAX_LOGPROBS = 20

# Stop ids the device checks per request (stages/runner/stop_flags.py); a request with
# more eos + stop_token_ids than this has the rest checked on the host.
STOP_TABLE_WIDTH = 16


class FinishReason(IntEnum):
    """Finish codes exactly as the ring's `finish[]` column carries them (SPEC 1.3)."""

    RUNNING = 0
    EOS = 1
    STOP = 2
    LENGTH = 3
    ABORTED = 4
    ERROR = 5

    @property
    def wire_name(self) -> str:
        """The `finish_reason` string of a `done` frame (SPEC 2.3)."""
        return self.name.lower()


class SamplingParams(msgspec.Struct, frozen=True, kw_only=True):
    """Per-request sampling settings, already validated at admission."""

    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None  # None: the scheduler assigns one at admission
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int = 0  # top-k candidates to return, 0..MAX_LOGPROBS
    speculative: bool = True  # False: never speculate for this request (SPEC 2.2)


class TokenStops(msgspec.Struct, frozen=True):
    """A request's token-level stop conditions in the form the device checks them
    (built once at admission: `request.token_stops`)."""

    ids: tuple[int, ...]  # eos ids (unless ignore_eos), then the stop_token_ids not among them
    num_eos: int  # the first num_eos ids end the request with EOS, the others with STOP
    max_outputs: int  # LENGTH once the request has this many outputs

    @property
    def table(self) -> tuple[int, ...]:
        """The ids the device holds."""
        return self.ids[:STOP_TABLE_WIDTH]

    @property
    def overflow(self) -> tuple[int, ...]:
        """The ids that did not fit the device's table: the host checks these."""
        return self.ids[STOP_TABLE_WIDTH:]


@dataclass(slots=True)
class ScheduledRow:
    """One request's share of a step.

    `token_ids` are the tokens whose KV this step computes, starting at
    position `start_pos` (= tokens already in the KV cache). For a decode row
    in overlap mode the input token is not on the host yet: then
    `from_prev_step` is True, `token_ids` is `[-1]` (a placeholder) and the
    runner takes the token this request sampled in the previous step straight
    from that step's device output.
    """

    req_id: int  # the u64 request id used on the ring
    token_ids: list[int]
    start_pos: int
    from_prev_step: bool
    sample: bool  # this row's last position yields an output token
    output_index: int  # index in the request's outputs of the token sampled here
    block_ids: list[int]  # the request's whole block table after this step's allocation
    params: SamplingParams
    seed: int  # the request's effective seed (user's, or assigned at admission)
    # None (rows made without a scheduler): the device never stops the row and
    # whoever reads the outputs checks the stops itself
    stops: TokenStops | None = None
    # speculative decoding: the last num_drafts of token_ids are drafts this
    # step verifies (stages/spec/); the row may emit up to num_drafts + 1 tokens
    num_drafts: int = 0
    # speculative "draft" (stages/spec/drafter.py): (start position, known
    # tokens) the draft network computes in this step before drafting; a verify
    # row's chunk ends with its last known token, whose draft argmax is d1
    draft_chunk: tuple[int, list[int]] | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


@dataclass(slots=True)
class SchedulerOutput:
    step_id: int  # 1, 2, 3, ... (the ring's meta[0])
    rows: list[ScheduledRow]
    # Requests that left the running set since the previous step (finished,
    # aborted or preempted): the runner frees their persistent rows.
    freed_req_ids: list[int] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(len(r.token_ids) for r in self.rows)

    @property
    def is_empty(self) -> bool:
        return not self.rows


@dataclass(slots=True)
class StepOutput:
    """What the device produced for one step, read back on the host.

    Row i corresponds to `SchedulerOutput.rows[i]`; rows with `sample=False`
    (a prefill chunk that is not the prompt's last) hold no meaningful values.
    """

    step_id: int
    req_ids: np.ndarray  # u64 [num_rows]
    sampled: np.ndarray  # i32 [num_rows]
    k: int  # logprob candidates carried per row (max requested this step)
    logprobs: np.ndarray | None  # f32 [num_rows, k + 1]: sampled token, then candidates
    top_ids: np.ndarray | None  # i32 [num_rows, k]
    ranks: np.ndarray | None  # i32 [num_rows]: rank of the sampled token, 1 = best
    # i32 [num_rows]: the device's token-level verdict per row (FinishReason
    # codes, 0 = running) for rows that carried `stops`; None: not computed
    finish: np.ndarray | None = None
    # steps with verify rows (stages/spec/verify.py): i32 [num_rows] tokens each
    # row emits (1 for plain rows), i32 [num_rows, T] each column's token, of
    # which a row emits the first accept_num, and with logprobs each column's
    # (f32 [num_rows, T, k + 1], i32 [num_rows, T, k], i32 [num_rows, T])
    accept_num: np.ndarray | None = None
    spec_tokens: np.ndarray | None = None
    spec_logprobs: np.ndarray | None = None
    spec_top_ids: np.ndarray | None = None
    spec_ranks: np.ndarray | None = None
