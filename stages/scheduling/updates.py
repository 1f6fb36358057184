"""Applying a step's outputs to the requests that scheduled it.

Overlap: schedule() may run before the previous step's outputs are known.
Each sampling row leaves a placeholder output on its request (its KV position
advances), so the next schedule() can decode it with `from_prev_step=True`.
update() turns placeholders into tokens in step order and applies the
token-level stop conditions (the device's verdict where the step carries
one). Sync mode runs the same code with update() between schedules, so both
modes make the same decisions wherever the outputs they know are the same.

Speculative decoding (stages/spec/planner.py): for a verify row, update()
appends the tokens the device accepted and the planner trims the rest.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..request import Request, device_stop_reason, token_stop_reason
from ..step_types import FinishReason, ScheduledRow, SchedulerOutput, StepOutput
from .state import SchedulerState


@dataclass(frozen=True, slots=True)
class SampledToken:
    """One output token that update() accepted (discarded ones never appear)."""

    request: Request
    req_id: int
    row_index: int  # row in the SchedulerOutput / StepOutput it came from
    token_id: int
    output_index: int
    finish_reason: FinishReason | None  # set when this token ended the request
    column: int = 0  # its token column in a verify row (StepOutput.spec_*), 0 otherwise


class StepUpdates(SchedulerState):
    """The request bookkeeping plus update() and skip_step(): what the host
    learns once a step's outputs are read back."""

    def update(self, so: SchedulerOutput, out: StepOutput) -> list[SampledToken]:
        """Apply one step's sampled tokens, in step order; returns the accepted ones."""
        if so.step_id != self._last_updated_step + 1:
            raise RuntimeError(f"update for step {so.step_id} but step {self._last_updated_step + 1} is next")
        if out.step_id != so.step_id or len(out.sampled) != len(so.rows):
            raise ValueError(f"step output {out.step_id} ({len(out.sampled)} rows) does not match step {so.step_id}")
        self._last_updated_step = so.step_id
        accepted: list[SampledToken] = []
        sampled = out.sampled.tolist()  # Python ints: indexing numpy per row costs more than the row
        finish = out.finish.tolist() if out.finish is not None else None
        accept_num = out.accept_num.tolist() if out.accept_num is not None else None
        for i, row in enumerate(so.rows):
            if not row.sample:
                continue
            req = self._requests.get(row.req_id)
            if req is None:
                raise RuntimeError(f"step {so.step_id} row {i}: request {row.req_id} is unknown")
            req.num_placeholders -= 1
            if req.is_finished:
                # Finished (or aborted) after this step was scheduled: its
                # output is never emitted.
                if req.num_placeholders == 0:
                    del self._requests[req.req_id]
                continue
            # chained on a verify row that rejected drafts: it ran that many outputs earlier
            output_index = row.output_index - (self.spec.output_lag(req, so.step_id) if self.spec is not None else 0)
            if output_index != len(req.output_token_ids):
                raise RuntimeError(f"{req}: output {output_index} arrived out of order")
            # A preempted request still takes this output (FastDeploy #6176)
            # and recomputes it with the rest when it runs again.
            if row.num_drafts:
                assert accept_num is not None and out.spec_tokens is not None and self.spec is not None
                accepted.extend(self._apply_verified(req, i, row, so.step_id, output_index,
                                                     out.spec_tokens[i, : accept_num[i]].tolist()))
                continue
            token = sampled[i]
            req.output_token_ids.append(token)
            if finish is not None and row.stops is not None:
                # the device checked the row's stops: only ids past its table are left
                reason = device_stop_reason(finish[i], token, row.stops)
            else:
                reason = token_stop_reason(req, token, self.eos_token_ids, self.max_model_len)
            if reason is not None:
                self._finish(req, reason)
            accepted.append(SampledToken(req, req.req_id, i, token, output_index, reason))
        return accepted

    def skip_step(self, so: SchedulerOutput) -> None:
        """A step whose outputs will never come (it failed on the device): its
        rows' requests must be finished already; settle their placeholders so
        the next step's update() is in order. A step already applied is left alone."""
        if so.step_id <= self._last_updated_step:
            return
        if so.step_id != self._last_updated_step + 1:
            raise RuntimeError(f"skip of step {so.step_id} but step {self._last_updated_step + 1} is next")
        self._last_updated_step = so.step_id
        for row in so.rows:
            req = self._requests.get(row.req_id)
            if not row.sample or req is None:
                continue
            if not req.is_finished:
                raise RuntimeError(f"{req}: its step failed but it is still live; finish it first")
            req.num_placeholders -= 1
            if req.num_placeholders == 0:
                del self._requests[req.req_id]

    def _apply_verified(self, req: Request, i: int, row: ScheduledRow, step_id: int, output_index: int,
                        tokens: list[int]) -> list[SampledToken]:
        """A verify row's tokens, in order, up to the first that ends the request
        (eos, a stop id, the length limit: nothing past it is emitted)."""
        out: list[SampledToken] = []
        for j, token in enumerate(tokens):
            req.output_token_ids.append(token)
            # the device's finish code is for one token a row: the host checks these
            reason = token_stop_reason(req, token, self.eos_token_ids, self.max_model_len)
            out.append(SampledToken(req, req.req_id, i, token, output_index + j, reason, j))
            if reason is not None:
                break
        assert self.spec is not None
        self.spec.verified(req, row, step_id, len(tokens), len(out), self.block_manager)
        if out[-1].finish_reason is not None:
            self._finish(req, out[-1].finish_reason)
        return out
