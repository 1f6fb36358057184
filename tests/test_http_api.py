"""The OpenAI-compatible HTTP API of the real daemon (tiny model), driven by the real `openai` client.

One daemon for the module, started the way systemd starts it with two socket
units (a unix listener named `overlapd`, a TCP one named `http`) and with an
API key file, so every request here also passes the key check.
"""

from __future__ import annotations

import asyncio
import os

import httpx
import openai
import pytest
from http_harness import API_KEY, HttpDaemon, serve_http_activated
from prometheus_client.parser import text_string_to_metric_families

from overlapd.daemon.client import Client


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("http")
    keys = tmp / "keys"
    keys.write_text(f"# one key a line\n{API_KEY}\n")
    os.chmod(keys, 0o600)
    d, unix, tcp = serve_http_activated(tmp, "--api-key-file", str(keys))
    try:
        yield d
    finally:
        d.kill()
        unix.close()
        tcp.close()


@pytest.fixture(scope="module")
def client(daemon: HttpDaemon) -> openai.OpenAI:
    # No retries: a 429 or 5xx must show up as the error it is.
    return openai.OpenAI(base_url=daemon.base_url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


SEEDED = dict(max_tokens=12, temperature=0.8, top_p=0.9, top_k=40, seed=1234)


def test_served_on_the_sockets_systemd_handed_over(daemon, client):
    assert '"inherited": true' in daemon.log()  # both the unix and the http listener
    assert [m.id for m in client.models.list().data] == ["tiny"]
    with Client(daemon.socket_path) as c:
        assert c.health().status == "ok"


def test_completion_streamed_and_whole_equal_the_socket_protocol(daemon, client):
    prompt = "Once upon a time"
    with Client(daemon.socket_path, timeout=30) as c:
        ref = c.complete(prompt, **SEEDED, ignore_eos=True)
    extra = {"top_k": SEEDED["top_k"], "ignore_eos": True}
    kw = {k: v for k, v in SEEDED.items() if k != "top_k"}
    whole = client.completions.create(model="tiny", prompt=prompt, extra_body=extra, **kw)
    assert whole.choices[0].text == ref.text
    assert whole.choices[0].finish_reason == "length"
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (
        ref.usage.prompt_tokens, ref.usage.completion_tokens)
    chunks = list(client.completions.create(model="tiny", prompt=prompt, stream=True, extra_body=extra,
                                            stream_options={"include_usage": True}, **kw))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == ref.text
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == SEEDED["max_tokens"]
    # Token ids as the prompt reach the same engine path.
    ids = client.completions.create(model="tiny", prompt=[5, 6, 7, 8], max_tokens=3, temperature=0)
    assert ids.usage.prompt_tokens == 4 and ids.usage.completion_tokens <= 3


def test_chat_streamed_equals_whole(client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello"}]
    whole = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0.7, seed=7)
    text = whole.choices[0].message.content
    assert whole.choices[0].message.role == "assistant" and whole.usage.completion_tokens >= 1
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0.7, seed=7,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == text
    assert chunks[-1].usage.total_tokens == whole.usage.total_tokens
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == whole.choices[0].finish_reason


def test_logprobs(client):
    done = client.completions.create(model="tiny", prompt="abc", max_tokens=5, temperature=0, logprobs=3,
                                     extra_body={"ignore_eos": True})
    lp = done.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert all(v <= 0 for v in lp.token_logprobs) and all(1 <= len(top) <= 3 for top in lp.top_logprobs)
    # Greedy: the chosen token is the most likely one.
    assert all(abs(max(top.values()) - v) < 1e-4 for top, v in zip(lp.top_logprobs, lp.token_logprobs))
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                          logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    content = chat.choices[0].logprobs.content
    assert len(content) == 4 and all(len(c.top_logprobs) == 2 for c in content)
    assert all(bytes(c.bytes).decode("utf-8", "replace") == c.token for c in content)


def test_disconnect_mid_stream_aborts_and_frees_every_kv_block(daemon, client):
    before = daemon.stats()
    stream = client.completions.create(model="tiny", prompt="a long story", max_tokens=400, stream=True,
                                       extra_body={"ignore_eos": True})
    got = 0
    for chunk in stream:
        got += 1
        if got == 3:
            break
    assert daemon.stats()["kv_blocks_used"] > 0  # still generating
    stream.close()  # the client goes away mid-stream
    after = daemon.wait_stats(lambda s: s["live_requests"] == 0 and s["kv_blocks_used"] == 0)
    assert after["kv_blocks_used"] == 0 and after["live_requests"] == 0
    assert after["aborted"] == before["aborted"] + 1
    assert after["tokens"] - before["tokens"] < 400


def test_200_concurrent_streaming_clients_all_finish(daemon):
    async def run() -> list[tuple[str, int]]:
        limits = httpx.Limits(max_connections=250, max_keepalive_connections=250)
        async with openai.AsyncOpenAI(base_url=daemon.base_url + "/v1", api_key=API_KEY, max_retries=0, timeout=120,
                                      http_client=httpx.AsyncClient(limits=limits, timeout=120)) as aclient:
            async def one(i: int) -> tuple[str, int]:
                stream = await aclient.completions.create(
                    model="tiny", prompt=f"client {i}", max_tokens=4, temperature=0, stream=True,
                    stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
                finish, tokens = "", 0
                async for chunk in stream:
                    if chunk.choices and chunk.choices[0].finish_reason:
                        finish = chunk.choices[0].finish_reason
                    if chunk.usage is not None:
                        tokens = chunk.usage.completion_tokens
                return finish, tokens
            return await asyncio.gather(*(one(i) for i in range(200)))

    results = asyncio.run(run())
    assert results == [("length", 4)] * 200
    idle = daemon.wait_stats(lambda s: s["live_requests"] == 0 and s["kv_blocks_used"] == 0)
    assert idle["kv_blocks_used"] == 0


def test_metrics_parse_and_match_the_stats_frame(daemon, client):
    client.completions.create(model="tiny", prompt="metrics", max_tokens=3, extra_body={"ignore_eos": True})
    body = httpx.get(daemon.base_url + "/metrics", timeout=10).text  # open to scrapers: no key
    families = {f.name: f for f in text_string_to_metric_families(body)}
    stats = daemon.stats()  # idle now: the gauges cannot move between the two reads
    for key in ("kv_blocks_used", "kv_blocks_free", "queue_waiting", "queue_running", "step_interval_ms"):
        assert families[f"overlapd_{key}"].samples[0].value == pytest.approx(stats[key])
    for key in ("requests", "tokens", "ring_records", "ring_readers_evicted", "steps"):
        assert families[f"overlapd_{key}"].type == "counter"
        assert families[f"overlapd_{key}"].samples[0].value == stats[key]
    ttft = families["overlapd_http_time_to_first_token_seconds"]
    assert ttft.type == "histogram"
    assert next(s.value for s in ttft.samples if s.name.endswith("_count")) >= 1
    assert next(s.value for s in families["overlapd_http_inter_token_latency_seconds"].samples
                if s.name.endswith("_count")) >= 2
    outcomes = {(s.labels["endpoint"], s.labels["outcome"]): s.value
                for s in families["overlapd_http_requests"].samples if s.name.endswith("_total")}
    assert outcomes[("completions", "length")] >= 1
    assert families["overlapd_http_completion_tokens"].samples[0].value >= 3


def test_a_client_that_gives_up_on_a_whole_answer_aborts_it_too(daemon):
    before = daemon.stats()
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(daemon.base_url + "/v1/completions", headers={"Authorization": f"Bearer {API_KEY}"},
                   json={"prompt": "never read", "max_tokens": 400, "ignore_eos": True}, timeout=httpx.Timeout(10, read=0.3))
    after = daemon.wait_stats(lambda s: s["live_requests"] == 0 and s["kv_blocks_used"] == 0)
    assert after["kv_blocks_used"] == 0 and after["aborted"] == before["aborted"] + 1
