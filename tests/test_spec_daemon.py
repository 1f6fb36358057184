"""Speculative decoding through the real daemon: `overlapd serve --speculative
ngram` on a real socket, the ring read back by `overlapd tail` in another
process, with overlap and --no-overlap.

Each daemon serves the same greedy requests twice, with speculation and with
`speculative: false` (SPEC 2.2): the token ids must be equal, the speculating
ones must have come in ring rows with accept_num > 1 (flag 2, T = k + 1), and
the plain one in plain records.
"""

from __future__ import annotations

import concurrent.futures
import json
import subprocess
import sys

import pytest
from daemon_harness import serve_real

from overlapd.daemon.client import Client

K = 4
PROMPTS = [
    [5, 6, 7, 8, 9] * 4 + [5, 6],
    list(range(3, 40)) * 2 + [3, 4],
    [11, 12, 13] * 5,
]


def complete(d, prompt_ids: list[int], speculative: bool):
    with Client(d.socket_path, timeout=120) as c:
        return c.complete(prompt_ids=prompt_ids, max_tokens=40, temperature=0.0, ignore_eos=True,
                          speculative=speculative)


@pytest.mark.parametrize("mode", ["overlap", "no-overlap"])
def test_speculative_tokens_reach_clients_and_the_ring(tmp_path, mode):
    flags = ["--speculative", "ngram", "--num-speculative-tokens", str(K)]
    if mode == "no-overlap":
        flags.append("--no-overlap")
    d = serve_real(tmp_path, *flags)
    try:
        with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as pool:
            spec = list(pool.map(lambda p: complete(d, p, True), PROMPTS))
        speculated = d.stats()
        plain = complete(d, PROMPTS[1], False)  # alone: its steps carry no verify rows
        stats = d.wait_stats(lambda s: s["live_requests"] == 0 and s["kv_blocks_used"] == 0)
        assert d.terminate() == 0
    finally:
        d.kill()

    assert plain.token_ids == spec[1].token_ids
    assert '"speculative_stats"' in d.log() and '"spec_accepted"' in d.log()
    assert all(len(c.token_ids) == 40 and c.finish_reason == "length" for c in spec)
    assert speculated["spec_accepted"] > 0 and speculated["spec_tokens_per_step"] > 1.0, speculated
    assert stats["spec_verify_rows"] == speculated["spec_verify_rows"]  # speculative: false took none
    assert stats["kv_blocks_used"] == 0 and stats["kv_blocks_free"] > 0

    # the ring, from another process
    tail = subprocess.run([sys.executable, "-m", "overlapd.daemon", "tail", str(d.ring_path), "--from-head"],
                          capture_output=True, text=True, timeout=60)
    assert tail.returncode == 0, tail.stderr
    records = [json.loads(line) for line in tail.stdout.splitlines()]
    assert records[-1]["step_id"] < 0
    tokens: dict[int, list[int]] = {}
    flags_of: dict[int, set[tuple[int, int]]] = {}
    for rec in records:
        for row in rec["rows"]:
            tokens.setdefault(row["request_id"], []).extend(row["tokens"])
            flags_of.setdefault(row["request_id"], set()).add((rec["flag"], rec["T"]))
            assert 1 <= len(row["tokens"]) <= rec["T"]
    for c in [*spec, plain]:
        assert tokens[c.request_id] == c.token_ids
    spec_rows = [row for rec in records if rec["flag"] == 2 for row in rec["rows"]]
    assert spec_rows and all(rec["T"] == K + 1 for rec in records if rec["flag"] == 2)
    assert max(len(row["tokens"]) for row in spec_rows) > 1
    assert flags_of[plain.request_id] == {(1, 1)}


def test_metrics_carry_the_speculative_counters(tmp_path):
    import httpx
    from http_harness import serve_http
    from prometheus_client.parser import text_string_to_metric_families

    d = serve_http(tmp_path, "--speculative", "ngram", "--num-speculative-tokens", str(K))
    try:
        complete(d, PROMPTS[0], True)
        stats = d.wait_stats(lambda s: s["live_requests"] == 0)
        body = httpx.get(d.base_url + "/metrics", timeout=10).text
        assert d.terminate() == 0
    finally:
        d.kill()
    families = {f.name: f for f in text_string_to_metric_families(body)}
    assert stats["spec_accepted"] > 0
    for key in ("spec_verify_rows", "spec_proposed", "spec_accepted", "spec_emitted"):
        assert families[f"overlapd_{key}"].type == "counter"
        assert families[f"overlapd_{key}"].samples[0].value == stats[key]
    for key in ("spec_acceptance_rate", "spec_tokens_per_step"):
        assert families[f"overlapd_{key}"].type == "gauge"
        assert families[f"overlapd_{key}"].samples[0].value == pytest.approx(stats[key])
