"""What a bad or unlucky HTTP client gets from the real daemon: OpenAI-shaped
errors with the right status (400, 401, 404, 405, 413, 429, 503), and no harm
to the other clients."""

from __future__ import annotations

import os
import threading
import time

import httpx
import openai
import pytest
from http_harness import API_KEY, HttpDaemon, serve_http

MAX_BODY = 64 * 1024
CONFIG = f"""
[http]
listen = "127.0.0.1:0"
max_live = 3
max_connections = 12
max_body_bytes = {MAX_BODY}
"""


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("httperr")
    keys = tmp / "keys"
    keys.write_text(API_KEY + "\n")
    os.chmod(keys, 0o600)
    d = serve_http(tmp, "--api-key-file", str(keys), config=CONFIG)
    try:
        yield d
    finally:
        d.kill()


def api(daemon: HttpDaemon) -> openai.OpenAI:
    return openai.OpenAI(base_url=daemon.base_url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


def post(daemon: HttpDaemon, path: str, *, auth: str | None = f"Bearer {API_KEY}", **kw) -> httpx.Response:
    headers = {"Authorization": auth} if auth else {}
    return httpx.post(daemon.base_url + path, headers=headers | kw.pop("headers", {}), timeout=30, **kw)


def assert_error(resp: httpx.Response, status: int, param: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"].endswith(".") and len(body["error"]["message"]) > 20
    if param is not None:
        assert body["error"]["param"] == param
    return body["error"]


def chunks(total: int, size: int = 16 * 1024):
    for _ in range(total // size):
        yield b"x" * size


COMPLETE = "/v1/completions"
CHAT = "/v1/chat/completions"


def test_bad_requests_get_the_right_status_and_do_not_hurt_a_live_stream(daemon):
    client = api(daemon)
    seeded = dict(model="tiny", prompt="a steady stream", max_tokens=48, temperature=0.9, seed=99,
                  extra_body={"ignore_eos": True})
    reference = client.completions.create(**seeded).choices[0].text
    streamed: list[str] = []

    def reader() -> None:
        for chunk in client.completions.create(stream=True, **seeded):
            streamed.append(chunk.choices[0].text)
            time.sleep(0.005)  # keep it live while the bad requests arrive

    t = threading.Thread(target=reader)
    t.start()
    try:
        assert_error(post(daemon, COMPLETE, content=b"{not json"), 400)["code"] == "invalid_json"
        assert_error(post(daemon, COMPLETE, content=b"[1, 2]"), 400)
        assert_error(post(daemon, COMPLETE, content=b"\xff\xfe"), 400)
        assert_error(post(daemon, COMPLETE, json={"prompt": "x", "max_tokens": "many"}), 400, "max_tokens")
        assert_error(post(daemon, COMPLETE, json={"prompt": "x", "temperature": -1}), 400, "temperature")
        assert_error(post(daemon, COMPLETE, json={"prompt": "x", "n": 2}), 400, "n")
        assert_error(post(daemon, COMPLETE, json={"prompt": "x", "max_tokens": 10**6}), 400, "max_tokens")
        assert_error(post(daemon, COMPLETE, json={"prompt": [1, "x"]}), 400, "prompt")
        assert_error(post(daemon, COMPLETE, json={"max_tokens": 3}), 400, "prompt")
        assert_error(post(daemon, CHAT, json={"messages": []}), 400, "messages")
        assert_error(post(daemon, CHAT, json={"messages": [{"role": "robot", "content": "x"}]}), 400, "messages")
        assert_error(post(daemon, CHAT, json={"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}),
                     400, "messages")
        assert_error(post(daemon, COMPLETE, json={"model": "gpt-4", "prompt": "x"}), 404, "model")
        assert_error(post(daemon, "/v1/embeddings", json={}), 404)
        assert_error(httpx.get(daemon.base_url + COMPLETE, headers={"Authorization": f"Bearer {API_KEY}"}), 405)
        # Oversize: announced by Content-Length, and chunked with no length at all.
        assert_error(post(daemon, COMPLETE, content=b"x" * (4 * MAX_BODY)), 413)
        assert_error(post(daemon, COMPLETE, content=chunks(4 * MAX_BODY)), 413)
        # API keys: missing, wrong, wrong scheme.
        assert_error(post(daemon, COMPLETE, auth=None, json={"prompt": "x"}), 401)
        assert_error(post(daemon, COMPLETE, auth="Bearer not-the-key-0123456789", json={"prompt": "x"}), 401)
        assert_error(post(daemon, COMPLETE, auth=f"Basic {API_KEY}", json={"prompt": "x"}), 401)
        assert httpx.get(daemon.base_url + "/v1/models", timeout=10).status_code == 401
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=daemon.base_url + "/v1", api_key="wrong-key-0123456789", max_retries=0).models.list()
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="nope", prompt="x", max_tokens=1)
        with pytest.raises(openai.BadRequestError):
            client.completions.create(model="tiny", prompt="x", max_tokens=0)
    finally:
        t.join(60)
    assert "".join(streamed) == reference
    assert httpx.get(daemon.base_url + "/health", timeout=10).json()["status"] == "ok"
    idle = daemon.wait_stats(lambda s: s["live_requests"] == 0 and s["kv_blocks_used"] == 0)
    assert idle["kv_blocks_used"] == 0


def test_over_max_live_is_429(daemon):
    client = api(daemon)
    streams = [client.completions.create(model="tiny", prompt=f"hold {i}", max_tokens=400, stream=True,
                                         extra_body={"ignore_eos": True}) for i in range(3)]
    try:
        for s in streams:
            next(iter(s))  # each is generating
        err = assert_error(post(daemon, COMPLETE, json={"prompt": "one more", "max_tokens": 2}), 429)
        assert err["code"] == "overloaded" and "max_live" in err["message"]
        with pytest.raises(openai.RateLimitError):
            client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=1)
    finally:
        for s in streams:
            s.close()
    daemon.wait_stats(lambda s: s["live_requests"] == 0)
    assert client.completions.create(model="tiny", prompt="again", max_tokens=2).usage.completion_tokens >= 1


def test_over_max_connections_a_new_connection_gets_429_and_is_closed(daemon):
    import socket

    held: list[socket.socket] = []
    refused = b""
    try:
        # Other tests' clients may still hold keep-alive connections: open until refused.
        for _ in range(13):
            s = socket.create_connection(("127.0.0.1", daemon.port), timeout=10)
            held.append(s)
            s.settimeout(0.3)
            try:
                refused = s.recv(4096)
            except TimeoutError:
                continue  # accepted, idle
            break
        assert refused.startswith(b"HTTP/1.1 429 "), refused
        assert b'"code":"overloaded"' in refused and b"max_connections" in refused
        held[-1].settimeout(10)
        assert held[-1].recv(4096) == b""  # and closed
    finally:
        for s in held:
            s.close()
    deadline = time.monotonic() + 10
    while True:  # the held connections are let go
        try:
            r = httpx.get(daemon.base_url + "/health", timeout=10)
            if r.status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_draining_is_503_and_live_streams_finish(tmp_path):
    d = serve_http(tmp_path)
    try:
        client = openai.OpenAI(base_url=d.base_url + "/v1", api_key="unused", max_retries=0, timeout=60)
        stream = client.completions.create(model="tiny", prompt="finish me", max_tokens=150, stream=True,
                                           extra_body={"ignore_eos": True})
        it = iter(stream)
        text = [next(it).choices[0].text]
        d.proc.send_signal(15)
        deadline = time.monotonic() + 20
        while httpx.get(d.base_url + "/health", timeout=10).status_code != 503:
            assert time.monotonic() < deadline, "health never said draining"
            time.sleep(0.02)
        assert httpx.get(d.base_url + "/health", timeout=10).json()["status"] == "draining"
        assert_error(httpx.post(d.base_url + COMPLETE, json={"prompt": "late"}, timeout=10), 503)["code"] == \
            "shutting_down"
        finish = None
        for chunk in it:
            text.append(chunk.choices[0].text)
            finish = chunk.choices[0].finish_reason or finish
        assert finish == "length"  # the live stream ran to its end during the drain
        assert d.proc.wait(30) == 0
    finally:
        d.kill()


def test_a_taken_port_stops_the_daemon_with_a_reason(tmp_path):
    import socket
    import subprocess

    from http_harness import serve_argv

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    try:
        port = taken.getsockname()[1]
        done = subprocess.run(serve_argv(tmp_path, "--no-ring", "--http", f"127.0.0.1:{port}"),
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 1
        assert "overlapd serve:" in done.stderr and str(port) in done.stderr
        assert not (tmp_path / "d.sock").exists()  # the socket server it had started was closed again
    finally:
        taken.close()
