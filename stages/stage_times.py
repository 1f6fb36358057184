"""Per-stage timing: where a step's host time goes, and what overlap hides."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

STAGES = ("preprocess", "launch", "wait", "postprocess", "emit")


@dataclass
class StageTimes:
    """Running sums of seconds spent per stage, plus the step-to-step interval."""

    totals: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))
    steps: int = 0
    first_step_end: float = 0.0
    last_step_end: float = 0.0

    def add(self, stage: str, seconds: float) -> None:
        self.totals[stage] += seconds

    def step_done(self) -> None:
        now = time.perf_counter()
        if not self.steps:
            self.first_step_end = now
        self.last_step_end = now
        self.steps += 1

    def snapshot(self) -> dict[str, float]:
        """Mean milliseconds per step for every stage, and the mean step interval."""
        n = max(self.steps, 1)
        out = {f"{k}_ms": 1e3 * v / n for k, v in self.totals.items()}
        span = self.last_step_end - self.first_step_end
        out["step_interval_ms"] = 1e3 * span / (self.steps - 1) if self.steps > 1 else 0.0
        # Host work that sits on the critical path when nothing overlaps it.
        out["host_overhead_ms"] = out["preprocess_ms"] + out["postprocess_ms"] + out["emit_ms"]
        return out
