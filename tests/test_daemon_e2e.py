"""The real daemon (`overlapd serve`, tiny model, Paddle) on a real socket, with its ring read here."""

from __future__ import annotations

import concurrent.futures
import signal
import struct
import sys
import time
from collections import defaultdict

import pytest
from daemon_harness import EchoDaemon, serve_real
from overlapd.daemon.client import RequestFailed
from overlapd.daemon.protocol import AcceptedFrame, DoneFrame, ErrorFrame, TokensFrame
from overlapd.kernels.ring import RingReader, Step

serve = serve_real


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    d = serve(tmp_path_factory.mktemp("e2e"), "--max-num-seqs", "8")
    yield d
    d.terminate()


def idle_stats(d: EchoDaemon) -> dict:
    def idle(s: dict) -> bool:
        # The engine's keys are missing only when its stats() raised: show why.
        assert "kv_blocks_used" in s, f"no engine stats in {sorted(s)}; daemon log:\n{d.log()}"
        return s["live_requests"] == 0 and s["kv_blocks_used"] == 0

    return d.wait_stats(idle)


def test_streaming_generate_ends_with_done_and_usage(daemon):
    with daemon.client() as c:
        frames = list(c.generate("Hello there", max_tokens=12, temperature=0.0, ignore_eos=True))
    assert isinstance(frames[0], AcceptedFrame) and frames[0].request_id >= 1
    tokens = [t for f in frames if isinstance(f, TokensFrame) for t in f.token_ids]
    done = frames[-1]
    assert isinstance(done, DoneFrame) and done.finish_reason == "length"
    assert len(tokens) == 12 == done.usage.completion_tokens and done.usage.prompt_tokens > 0
    assert all(isinstance(f, TokensFrame) for f in frames[1:-1])


def test_greedy_is_repeatable_and_seeded_sampling_too(daemon):
    with daemon.client() as c:
        a = c.complete("The cat", max_tokens=10, temperature=0.0, ignore_eos=True)
        b = c.complete("The cat", max_tokens=10, temperature=0.0, ignore_eos=True)
        s1 = c.complete("The cat", max_tokens=10, temperature=0.9, top_p=0.9, seed=7, ignore_eos=True)
        s2 = c.complete("The cat", max_tokens=10, temperature=0.9, top_p=0.9, seed=7, ignore_eos=True)
    assert a.token_ids == b.token_ids and s1.token_ids == s2.token_ids


def test_abort_ends_the_request_and_frees_its_blocks(daemon):
    with daemon.client() as c:
        stream = c.generate("abort me", max_tokens=1500, ignore_eos=True)
        for frame in stream:
            if isinstance(frame, TokensFrame):
                break
        stream.abort()
        rest = list(stream)
    assert isinstance(rest[-1], DoneFrame) and rest[-1].finish_reason == "aborted"
    s = idle_stats(daemon)
    assert s["kv_blocks_used"] == 0 and s["live_requests"] == 0


def test_client_disconnect_aborts_its_requests_and_frees_blocks(daemon):
    with daemon.raw() as raw:
        for i in range(3):
            raw.send({"type": "generate", "id": f"r{i}", "prompt": "bye", "max_tokens": 1500, "ignore_eos": True})
        raw.recv_until(lambda f: isinstance(f, TokensFrame))
    s = idle_stats(daemon)
    assert s["kv_blocks_used"] == 0 and s["live_requests"] == 0 and s["aborted"] >= 3


def test_bad_requests_get_errors_naming_the_field_and_the_daemon_keeps_serving(daemon):
    with daemon.raw() as raw:
        raw.send_bytes(struct.pack(">I", 5) + b"\xc1\xc1\xc1\xc1\xc1")  # not MessagePack
        assert isinstance(raw.recv(), ErrorFrame)
        raw.send({"type": "generate", "id": "t", "prompt": "x", "top_p": 1.5})
        err = raw.recv()
        assert isinstance(err, ErrorFrame) and err.code == "invalid_request" and "top_p" in err.message
        raw.send({"type": "generate", "id": "long", "prompt_ids": [5] * 5000})
        err = raw.recv()
        assert isinstance(err, ErrorFrame) and err.code == "invalid_request" and "prompt" in err.message
    with daemon.client() as c:
        assert c.health().status == "ok"


def test_ring_records_match_what_the_clients_received(daemon):
    reader = RingReader(daemon.ring_path)  # live, from the tail: only what follows
    prompts = ["one", "two two", "three three three", "four"]

    def run(prompt: str):
        with daemon.client() as c:
            return c.complete(prompt, max_tokens=9, temperature=0.0, ignore_eos=True, logprobs=2)

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(run, prompts))
    by_request: dict[int, list[int]] = defaultdict(list)
    finish: dict[int, int] = {}
    deadline = time.monotonic() + 10
    wanted = {r.request_id for r in results}
    while time.monotonic() < deadline and not all(rid in finish for rid in wanted):
        item = reader.read(timeout=0.5)
        if isinstance(item, Step):
            v = item.view
            assert v.k == 2 and v.T == 1
            for i, rid in enumerate(v.request_id.tolist()):
                by_request[rid].extend(v.tokens[i, : v.accept_num[i], 0].tolist())
                if v.finish[i]:
                    finish[rid] = int(v.finish[i])
    reader.close()
    for r in results:
        assert by_request[r.request_id] == r.token_ids
        assert finish[r.request_id] == 3  # length
        assert len(r.logprobs) == 9 and all(len(lp.top) == 2 for lp in r.logprobs)


def test_overload_answers_overloaded_and_the_daemon_recovers(tmp_path):
    d = serve(tmp_path, "--max-num-seqs", "1", config="[pipeline]\nmax_waiting = 2\n")
    try:
        with d.raw() as raw:
            for i in range(12):
                raw.send({"type": "generate", "id": f"r{i}", "prompt": "busy", "max_tokens": 40, "ignore_eos": True})
            ends: dict[str, str] = {}
            while len(ends) < 12:
                f = raw.recv()
                assert f is not None
                if isinstance(f, DoneFrame):
                    ends[f.id] = f.finish_reason
                elif isinstance(f, ErrorFrame):
                    ends[f.id] = f.code
        assert "overloaded" in ends.values() and "length" in ends.values()
        assert set(ends.values()) <= {"overloaded", "length"}
        with d.client() as c:
            assert c.complete("again", max_tokens=3).finish_reason in ("length", "eos")
    finally:
        d.terminate()


def test_sigterm_drains_every_accepted_request_and_closes_the_ring(tmp_path):
    d = serve(tmp_path, "--drain-timeout", "1")
    reader = RingReader(d.ring_path)
    try:
        with d.raw() as raw:
            for i in range(4):
                raw.send({"type": "generate", "id": f"r{i}", "prompt": "drain", "max_tokens": 1500, "ignore_eos": True})
            raw.recv_until(lambda f: isinstance(f, TokensFrame))
            t0 = time.monotonic()
            d.proc.send_signal(signal.SIGTERM)
            ends: dict[str, list[str]] = defaultdict(list)
            while (f := raw.recv()) is not None:
                if isinstance(f, (DoneFrame, ErrorFrame)):
                    ends[f.id].append(getattr(f, "finish_reason", None) or f.code)
        assert d.proc.wait(15) == 0
        assert time.monotonic() - t0 < 10
        assert sorted(ends) == [f"r{i}" for i in range(4)] and all(len(v) == 1 for v in ends.values())
        last = None
        while (item := reader.read(timeout=1)) is not None:
            if isinstance(item, Step):
                last = item
                if item.view.step_id < 0:
                    break
        assert last is not None and last.view.step_id < 0
        assert reader._native.closed_cleanly
    finally:
        reader.close()
        d.kill()


def test_overlap_and_no_overlap_give_identical_tokens(tmp_path):
    requests = [
        dict(prompt="alpha", max_tokens=16, temperature=0.0, ignore_eos=True),
        dict(prompt="beta beta", max_tokens=12, temperature=0.8, top_k=20, seed=3, ignore_eos=True),
        dict(prompt="gamma", max_tokens=14, temperature=1.0, top_p=0.8, seed=11, ignore_eos=True),
    ]
    outputs = []
    for flags in ((), ("--no-overlap",)):
        (tmp_path / str(len(outputs))).mkdir()
        d = serve(tmp_path / str(len(outputs)), *flags)
        try:
            with concurrent.futures.ThreadPoolExecutor(3) as pool:

                def run(kw):
                    with d.client() as c:
                        return c.complete(**kw).token_ids

                outputs.append(list(pool.map(run, requests)))
        finally:
            assert d.terminate() == 0
    assert outputs[0] == outputs[1]


def test_a_request_failing_validation_never_gets_accepted(daemon):
    with daemon.client() as c:
        with pytest.raises(RequestFailed) as info:
            c.complete("x", max_tokens=0)
    assert "max_tokens" in str(info.value)


def test_overlapd_bench_drives_the_daemon_and_reports_percentiles(daemon):
    import json
    import subprocess

    proc = subprocess.run(
        [sys.executable, "-m", "overlapd.daemon", "bench", "--socket", str(daemon.socket_path),
         "--clients", "3", "--requests", "6", "--max-tokens", "5", "--json"],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["requests"] == 6 and summary["errors"] == {}
    assert summary["output_tokens_per_s"] > 0
    assert 0 < summary["ttft_ms"]["p50"] <= summary["ttft_ms"]["p99"]
    # 6 requests x 5 tokens in engine steps of at most 3 rows (3 clients, one request each at a time)
    assert summary["steps"] >= 10 and 1 <= summary["tokens_per_step"] <= 3
    assert "spec_verify_rows" not in summary  # this daemon does not speculate
    assert "100.0%" in proc.stderr  # the progress bar reached the end


def test_generate_via_socket_streams_text(daemon):
    import subprocess

    proc = subprocess.run(
        [sys.executable, "-m", "overlapd.daemon", "generate", "--socket", str(daemon.socket_path), "Hi", "--max-tokens", "6"],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "6 generated tokens" in proc.stderr and proc.stdout.strip()


def test_generate_in_process_needs_no_daemon():
    import subprocess

    proc = subprocess.run(
        [sys.executable, "-m", "overlapd.daemon", "generate", "Hello", "--max-tokens", "8", "--ignore-eos", "--model", "tiny"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "[length: " in proc.stderr and "8 generated tokens" in proc.stderr
    assert proc.stdout.strip()


def test_a_top_k_beyond_int64_is_refused_and_the_pipeline_lives(daemon):
    # Found by tests/test_reliability_fuzz.py: top_k = 2**64-1 passed validation, overflowed the
    # int64 staging buffer and killed the preprocess stage (and with it the daemon).
    with daemon.raw() as raw:
        raw.send({"type": "generate", "id": "k", "prompt": "x", "max_tokens": 2, "temperature": 1.0, "top_k": 2**64 - 1})
        err = raw.recv()
        assert isinstance(err, ErrorFrame) and err.code == "invalid_request" and "top_k" in err.message, err
        raw.send({"type": "generate", "id": "ok", "prompt": "x", "max_tokens": 2, "temperature": 1.0, "top_k": 2**63 - 1})
        frames = raw.recv_until_end("ok")
        assert isinstance(frames[-1], DoneFrame) and frames[-1].finish_reason == "length", frames
    assert daemon.proc.poll() is None
