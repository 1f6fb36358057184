"""The scheduler's counters in one snapshot (`Scheduler.stats`): the daemon's stats and the tests read it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class SchedulerStats:
    num_waiting: int
    num_running: int
    num_blocks_used: int
    num_blocks_free: int
    num_preemptions: int
    num_steps: int
    num_blocks_evictable: int  # cached, held by nobody: counted neither used nor free
    num_blocks_cached: int  # holding a cached prefix, held or evictable
    prefix_queried_tokens: int  # tokens of every sequence admitted from the waiting queue
    prefix_hit_tokens: int  # of those, found in the prefix cache instead of computed
    prompt_tokens_computed: int  # prompt positions actually computed (recomputes included)
