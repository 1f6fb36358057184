"""Prefix caching in the real daemon (`overlapd serve`, tiny model): a second
request that resends a first one's prefix is served from the cache, gives
the tokens an uncached daemon gives, and the socket's stats say so."""

from __future__ import annotations

import pytest
from daemon_harness import serve_real

SYSTEM = "You are overlapd's test assistant. Keep every answer short and plain, and never apologise. " * 3
TURN1 = SYSTEM + "User: what is a ring buffer?\nAssistant:"
GREEDY = dict(max_tokens=12, temperature=0.0, ignore_eos=True)
SEEDED = dict(max_tokens=12, temperature=0.8, top_p=0.9, seed=11, ignore_eos=True)


def conversation(tmp, *flags: str, config: str | None = None) -> tuple[list[list[int]], list[dict]]:
    """Turn 1, then turn 2 resending turn 1 and its answer; stats after each."""
    d = serve_real(tmp, "--model", "tiny", *flags, config=config)
    try:
        outputs, stats = [], []
        prompt = TURN1
        for params in (GREEDY, SEEDED):
            with d.client(timeout=60) as c:
                done = c.complete(prompt, **params)
            outputs.append(done.token_ids)
            stats.append(d.wait_stats(lambda s: s["live_requests"] == 0 and s["kv_blocks_used"] == 0))
            prompt = prompt + done.text + "\nUser: and a queue?\nAssistant:"
        assert d.terminate() == 0, d.log()
    finally:
        d.kill()
    return outputs, stats


@pytest.fixture(scope="module")
def uncached(tmp_path_factory):
    return conversation(tmp_path_factory.mktemp("off"), "--no-prefix-cache")


def test_the_second_turn_is_served_from_the_cache(tmp_path, uncached) -> None:
    outputs, (s1, s2) = conversation(tmp_path)
    assert outputs == uncached[0], "the cache changed the tokens"
    # turn 1 computed its whole prompt, then left its full blocks in the pool
    assert s1["prefix_cache_hit_tokens"] == 0 and s1["prompt_tokens_computed"] == s1["prefix_cache_queried_tokens"]
    # (its answer's too: the KV of prompt + 11 of the 12 outputs was computed)
    computed_positions = s1["prefix_cache_queried_tokens"] + GREEDY["max_tokens"] - 1
    assert s1["kv_blocks_cached"] == s1["kv_blocks_evictable"] == computed_positions // 16
    assert s1["kv_blocks_free"] + s1["kv_blocks_evictable"] == s1["kv_blocks_total"]
    # turn 2 found turn 1 (prompt and answer, but the last partial block) and computed only the rest
    turn2_tokens = s2["prefix_cache_queried_tokens"] - s1["prefix_cache_queried_tokens"]
    hit = s2["prefix_cache_hit_tokens"]
    computed = s2["prompt_tokens_computed"] - s1["prompt_tokens_computed"]
    assert hit >= s1["prefix_cache_queried_tokens"] - 16, (hit, s1)
    assert computed == turn2_tokens - hit
    assert 0 < s2["prefix_cache_hit_rate"] < 1
    assert s2["kv_blocks_used"] == 0 and s2["kv_blocks_cached"] == s2["kv_blocks_evictable"]


def test_off_by_flag_and_by_config_key(tmp_path, uncached) -> None:
    _, (s1, s2) = uncached
    assert s2["prefix_cache_hit_tokens"] == 0 and s2["kv_blocks_cached"] == s2["kv_blocks_evictable"] == 0
    assert s2["prompt_tokens_computed"] == s2["prefix_cache_queried_tokens"] > 0
    assert s2["kv_blocks_free"] == s2["kv_blocks_total"]
    outputs, (_, c2) = conversation(tmp_path, config="[engine]\nprefix_cache = false\n")
    assert outputs == uncached[0]
    assert c2["prefix_cache_hit_tokens"] == 0 and c2["kv_blocks_cached"] == 0
