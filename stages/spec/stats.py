"""Speculative decoding counters (the socket `stats` frame and /metrics carry them)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class SpecStats:
    verify_rows: int = 0  # rows that carried at least one draft
    proposed: int = 0  # drafts in those rows
    accepted: int = 0  # drafts equal to the target's own tokens
    emitted: int = 0  # tokens those rows emitted (accepted drafts + the target's next token, after stops)
    chained_rows: int = 0  # rows planned while the request's previous row was in flight (planner.py)
    lagged_rows: int = 0  # chained rows whose row before rejected a draft: moved back on the device
    paused_steps: int = 0  # steps that drafted nothing: more requests ran than speculative_max_batch

    def record(self, proposed: int, accepted: int, emitted: int) -> None:
        self.verify_rows += 1
        self.proposed += proposed
        self.accepted += accepted
        self.emitted += emitted

    def snapshot(self) -> dict[str, int | float]:
        return {
            "spec_verify_rows": self.verify_rows,
            "spec_proposed": self.proposed,
            "spec_accepted": self.accepted,
            "spec_emitted": self.emitted,
            "spec_chained_rows": self.chained_rows,
            "spec_lagged_rows": self.lagged_rows,
            "spec_paused_steps": self.paused_steps,
            "spec_acceptance_rate": self.accepted / self.proposed if self.proposed else 0.0,
            # tokens a speculating row gains per step (1.0 = no gain over plain decoding)
            "spec_tokens_per_step": self.emitted / self.verify_rows if self.verify_rows else 0.0,
        }
