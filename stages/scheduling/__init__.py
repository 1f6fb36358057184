"""Continuous batching: which requests run in each step, and what their outputs do.

- `scheduler.py`: the policy, `Scheduler.schedule()` (the three passes,
  admission, preemption, prefix-cache hits, speculative drafts);
- `updates.py`: a step's outputs applied to its requests (`update()`,
  `skip_step()`, verify rows), and `SampledToken`;
- `state.py`: the request bookkeeping both act on (queues, finishing,
  preemption's state change), and `SchedulerFull`;
- `stats.py`: `SchedulerStats`.
"""

from .scheduler import Scheduler
from .state import SchedulerFull
from .stats import SchedulerStats
from .updates import SampledToken

__all__ = ["SampledToken", "Scheduler", "SchedulerFull", "SchedulerStats"]
