"""From a step's device output to what clients and the ring receive.

`OutputProcessor.process(so, out)` applies the step to the scheduler
(`update`: placeholders become tokens, token-level stops), detokenizes each
accepted token, applies stop strings (finishing the request in the scheduler,
which frees its blocks), and returns per-request `RequestOutput`s plus the
step's ring rows (`RingRows`, the columns of SPEC 1.3).

Text of the token that ended a request on eos or a stop token id is not
added (as vLLM does by default); its id is still in `new_token_ids`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import msgspec
import numpy as np

from overlapd.kernels.meta import FLAG_NORMAL, FLAG_SPECULATIVE

from ..request import Request
from ..scheduling import SampledToken, Scheduler
from ..spec import outputs as spec_outputs
from ..step_types import FinishReason, SchedulerOutput, StepOutput
from .detokenizer import Decoder, IncrementalDetokenizer


class TokenLogprob(msgspec.Struct, frozen=True):
    """One emitted token's logprob entry, as a `tokens` frame carries it (SPEC 2.3)."""

    token_id: int
    logprob: float
    rank: int  # 1 = the most likely token
    top: list[tuple[int, float]]  # (token_id, logprob), best first, as many as the request asked


@dataclass(slots=True)
class RequestOutput:
    req_id: int
    new_token_ids: list[int]
    text_delta: str
    logprobs: list[TokenLogprob] | None  # None unless the request asked for logprobs
    finish_reason: FinishReason | None  # None while the request runs
    prompt_tokens: int
    completion_tokens: int  # all output tokens so far, including these

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(slots=True)
class RingRows:
    """One step's rows for the ring: the requests that emitted tokens (SPEC 1.3;
    T = 1, or k + 1 with flag 2 in a step that verified drafts)."""

    step_id: int
    k: int  # logprob candidates per token, the step's k
    request_id: np.ndarray  # u64 [bsz]
    finish: np.ndarray  # i32 [bsz], FinishReason codes
    accept_num: np.ndarray  # i32 [bsz]: tokens each row emitted (1 without speculation)
    tokens: np.ndarray  # i32 [bsz, T, k+1]: the emitted tokens, each then its top-k candidate ids
    logprobs: np.ndarray | None  # f32 [bsz, T, k+1] when k > 0
    ranks: np.ndarray | None  # i32 [bsz, T] when k > 0
    flag: int = FLAG_NORMAL

    @property
    def bsz(self) -> int:
        return int(self.request_id.shape[0])

    def columns(self) -> dict[str, Any]:
        """Keyword arguments for `overlapd.kernels.meta.step_columns` / `pack_step`."""
        return {
            "step_id": self.step_id,
            "request_id": self.request_id,
            "finish": self.finish,
            "tokens": self.tokens,
            "accept_num": self.accept_num,
            "logprobs": self.logprobs,
            "ranks": self.ranks,
            "flag": self.flag,
        }


class StepResult(NamedTuple):
    """Unpacks as `outputs, ring_rows = processor.process(so, out)`."""

    outputs: list[RequestOutput]
    ring: RingRows


@dataclass(slots=True)
class _RequestState:
    detok: IncrementalDetokenizer
    num_logprobs: int
    prompt_tokens: int
    completion_tokens: int = 0


_ENDS_WITHOUT_TEXT = (FinishReason.EOS, FinishReason.STOP)


class OutputProcessor:
    def __init__(self, scheduler: Scheduler, tokenizer: Decoder) -> None:
        self.scheduler = scheduler
        self.tokenizer = tokenizer
        self._states: dict[int, _RequestState] = {}

    def add_request(self, req: Request) -> None:
        """Start tracking a request the scheduler has admitted.

        Optional: a request seen first in process() is tracked from then on.
        Registering early only lets abort() report its prompt size.
        """
        self._states[req.req_id] = self._new_state(req)

    def _new_state(self, req: Request) -> _RequestState:
        return _RequestState(
            detok=IncrementalDetokenizer(self.tokenizer, req.prompt_token_ids, req.params.stop),
            num_logprobs=req.params.logprobs,
            prompt_tokens=req.num_prompt_tokens,
        )

    def abort(self, req_id: int) -> RequestOutput | None:
        """Abort a request: its blocks are freed now and held-back text is dropped."""
        req = self.scheduler.get_request(req_id)
        if req is None or not self.scheduler.abort(req_id):
            return None
        st = self._states.pop(req_id, None)
        completion = st.completion_tokens if st is not None else 0
        return RequestOutput(req_id, [], "", None, FinishReason.ABORTED, req.num_prompt_tokens, completion)

    def process(self, so: SchedulerOutput, out: StepOutput) -> StepResult:
        accepted = self.scheduler.update(so, out)
        if out.accept_num is not None:
            return self._process_speculative(so, out, accepted)
        outputs: list[RequestOutput] = []
        finish_codes: list[int] = []
        for tok in accepted:
            result = self._one(tok, out)
            outputs.append(result)
            finish_codes.append(int(result.finish_reason or FinishReason.RUNNING))
        rows = np.fromiter((t.row_index for t in accepted), dtype=np.intp, count=len(accepted))
        return StepResult(outputs, _ring_rows(out, rows, np.asarray(finish_codes, dtype=np.int32)))

    def _process_speculative(self, so: SchedulerOutput, out: StepOutput, accepted: list[SampledToken]) -> StepResult:
        """A step that verified drafts: a verify row's tokens come one after
        another (up to a stop string: later ones are dropped), then merge into
        one output and one ring row per request."""
        outputs: list[RequestOutput] = []
        rows: list[int] = []
        for tok in accepted:
            if rows and rows[-1] == tok.row_index and outputs[-1].finished:
                continue  # a stop string ended the request earlier in this row
            outputs.append(self._one(tok, out))
            rows.append(tok.row_index)
        merged, rows = spec_outputs.merge(outputs, rows)
        k = out.k if out.logprobs is not None else 0
        finish = np.fromiter((int(m.finish_reason or FinishReason.RUNNING) for m in merged), np.int32, count=len(merged))
        ring = RingRows(step_id=out.step_id, k=k, request_id=np.asarray(out.req_ids, dtype=np.uint64)[rows],
                        finish=finish, flag=FLAG_SPECULATIVE,
                        **spec_outputs.ring_columns(merged, rows, out, k))  # type: ignore[arg-type]
        return StepResult(merged, ring)

    def _one(self, tok: SampledToken, out: StepOutput) -> RequestOutput:
        st = self._states.get(tok.req_id)
        if st is None:
            st = self._states[tok.req_id] = self._new_state(tok.request)
        st.completion_tokens += 1
        reason = tok.finish_reason
        if reason in _ENDS_WITHOUT_TEXT:
            text = st.detok.finish()
        else:
            text = st.detok.add(tok.token_id)
            if st.detok.stopped_on is not None:
                reason = FinishReason.STOP
                self.scheduler.finish_request(tok.req_id, reason)  # no-op if it already ended on length
            elif reason is not None:
                text += st.detok.finish()
        if reason is not None:
            del self._states[tok.req_id]
        return RequestOutput(
            req_id=tok.req_id,
            new_token_ids=[tok.token_id],
            text_delta=text,
            logprobs=_logprobs(out, tok, st.num_logprobs) if st.num_logprobs else None,
            finish_reason=reason,
            prompt_tokens=st.prompt_tokens,
            completion_tokens=st.completion_tokens,
        )


def _logprobs(out: StepOutput, tok: SampledToken, n: int) -> list[TokenLogprob]:
    if out.logprobs is None or out.ranks is None or out.top_ids is None:
        raise ValueError(f"request {tok.req_id} asked for logprobs but step {out.step_id} carries none")
    i, n = tok.row_index, min(n, out.k)
    if out.spec_logprobs is not None and out.spec_top_ids is not None and out.spec_ranks is not None:
        lp, ids, rank = out.spec_logprobs[i, tok.column], out.spec_top_ids[i, tok.column], out.spec_ranks[i, tok.column]
    else:
        lp, ids, rank = out.logprobs[i], out.top_ids[i], out.ranks[i]
    top = [(int(ids[j]), float(lp[j + 1])) for j in range(n)]
    return [TokenLogprob(tok.token_id, float(lp[0]), int(rank), top)]


def _ring_rows(out: StepOutput, rows: np.ndarray, finish: np.ndarray) -> RingRows:
    bsz = len(rows)
    k = out.k if out.logprobs is not None else 0
    tokens = np.zeros((bsz, 1, k + 1), dtype=np.int32)
    tokens[:, 0, 0] = out.sampled[rows]
    logprobs = ranks = None
    if k > 0:
        assert out.top_ids is not None and out.ranks is not None and out.logprobs is not None
        tokens[:, 0, 1:] = out.top_ids[rows, :k]
        logprobs = np.ascontiguousarray(out.logprobs[rows, None, : k + 1], dtype=np.float32)
        ranks = np.ascontiguousarray(out.ranks[rows, None], dtype=np.int32)
    return RingRows(
        step_id=out.step_id,
        k=k,
        request_id=np.asarray(out.req_ids, dtype=np.uint64)[rows],
        finish=finish,
        accept_num=np.ones(bsz, dtype=np.int32),
        tokens=tokens,
        logprobs=logprobs,
        ranks=ranks,
    )
