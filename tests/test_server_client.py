"""The socket server (daemon/server.py) in a real subprocess on a real unix
socket, served by the protocol test engine and driven by the client library
or by raw frames."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import stat
import subprocess
import sys
import time

import pytest
from daemon_harness import EchoDaemon, RawConn, echo_daemon

from overlapd.daemon.client import AsyncClient, Client, ConnectionLost, DaemonUnavailable, RequestFailed
from overlapd.daemon.protocol import (
    AcceptedFrame,
    DoneFrame,
    ErrorFrame,
    GenerateFrame,
    HealthFrame,
    HealthQuery,
    TokensFrame,
    encode_raw_frame,
)

TEST_BOUND_S = 30


@pytest.fixture(autouse=True)
def _bounded_in_time():
    def expire(signum, frame):
        raise TimeoutError(f"test ran past its {TEST_BOUND_S}s bound")

    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(TEST_BOUND_S)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    # A step every 2 ms: long prompts stay live long enough to abort or drop.
    with echo_daemon(tmp_path_factory.mktemp("d") / "echo.sock", "--tick-s", "0.002") as d:
        yield d


def ids(n: int) -> list[int]:
    return [i % 250 + 1 for i in range(n)]


# ------------------------------------------------------------------ streaming


def test_stream_is_accepted_then_tokens_then_one_done(daemon):
    with daemon.raw() as conn:
        conn.send(GenerateFrame(id="s1", prompt_ids=[10, 300, 20], max_tokens=8))
        frames = conn.recv_until_end("s1")
    assert isinstance(frames[0], AcceptedFrame) and frames[0].request_id > 0
    assert [t for f in frames[1:-1] for t in f.token_ids] == [10, 300, 20]
    assert all(isinstance(f, TokensFrame) and f.logprobs is None for f in frames[1:-1])
    done = frames[-1]
    assert isinstance(done, DoneFrame) and done.finish_reason == "eos"
    assert (done.usage.prompt_tokens, done.usage.completion_tokens) == (3, 3)


def test_client_streams_text_and_logprobs(daemon):
    with daemon.client() as c:
        result = c.complete("héllo wörld", max_tokens=100, logprobs=3)
        assert result.text == "héllo wörld" and result.finish_reason == "eos"
        assert len(result.logprobs) == len("héllo wörld".encode()) and len(result.logprobs[0].top) == 3
        short = c.complete(prompt_ids=ids(50), max_tokens=5)
        assert short.token_ids == ids(5) and short.finish_reason == "length"
        stop = c.complete(prompt_ids=[1, 2, 3, 4], stop_token_ids=[3])
        assert stop.token_ids == [1, 2, 3] and stop.finish_reason == "stop"


def test_many_concurrent_streams_on_one_async_connection(daemon):
    async def main() -> None:
        client = await AsyncClient.connect(daemon.socket_path, timeout=10)
        async with client:
            results = await asyncio.gather(
                *(client.complete(prompt_ids=[i + 1] * (i % 7 + 1), max_tokens=50) for i in range(40))
            )
            assert [r.token_ids for r in results] == [[i + 1] * (i % 7 + 1) for i in range(40)]
            assert (await client.health()).status == "ok"

    asyncio.run(asyncio.wait_for(main(), 20))


def test_invalid_request_is_answered_with_the_field(daemon):
    with daemon.client() as c:
        with pytest.raises(RequestFailed) as err:
            c.complete("x", top_p=2.0)
        assert err.value.code == "invalid_request" and "`top_p`" in err.value.message
        assert c.health().status == "ok"


# ------------------------------------------------------------------ abort, duplicates, disconnects


def test_abort_ends_the_request_with_aborted(daemon):
    with daemon.client() as c:
        stream = c.generate(prompt_ids=ids(5000), max_tokens=5000)
        events = [next(stream), next(stream)]
        stream.abort()
        events += list(stream)
    assert isinstance(events[0], AcceptedFrame)
    assert isinstance(events[-1], DoneFrame) and events[-1].finish_reason == "aborted"
    assert sum(isinstance(e, (DoneFrame, ErrorFrame)) for e in events) == 1
    assert events[-1].usage.completion_tokens < 5000


def test_abort_of_an_unknown_id_is_ignored(daemon):
    with daemon.raw() as conn:
        conn.send({"type": "abort", "id": "never-sent"})
        conn.send(HealthQuery())
        assert isinstance(conn.recv(), HealthFrame)


def test_duplicate_live_id_is_refused_and_the_original_goes_on(daemon):
    with daemon.raw() as conn:
        conn.send(GenerateFrame(id="dup", prompt_ids=ids(200), max_tokens=200))
        conn.send(GenerateFrame(id="dup", prompt_ids=[1]))
        frames = []
        while True:
            frames.append(conn.recv())
            if isinstance(frames[-1], DoneFrame):
                break
    errors = [f for f in frames if isinstance(f, ErrorFrame)]
    assert len(errors) == 1 and errors[0].id == "dup" and errors[0].code == "invalid_request"
    assert "`id`" in errors[0].message
    assert [f.token_ids[0] for f in frames if isinstance(f, TokensFrame)] == ids(200)
    assert sum(isinstance(f, AcceptedFrame) for f in frames) == 1


def test_an_id_is_reusable_once_its_request_ended(daemon):
    with daemon.client() as c:
        assert c.complete(prompt_ids=[5], id="again").token_ids == [5]
        assert c.complete(prompt_ids=[6], id="again").token_ids == [6]


def test_disconnect_aborts_live_requests(daemon):
    before = daemon.stats()
    conn = daemon.raw()
    for i in range(5):
        conn.send(GenerateFrame(id=f"g{i}", prompt_ids=ids(20000), max_tokens=20000))
    accepted = 0
    while accepted < 5:
        accepted += isinstance(conn.recv(), AcceptedFrame)
    conn.close()
    after = daemon.wait_stats(lambda s: s["running"] == 0 and s["aborted"] >= before["aborted"] + 5)
    assert after["running"] == 0
    assert after["aborted"] - before["aborted"] == 5
    assert after["disconnect_aborts"] - before["disconnect_aborts"] == 5
    assert after["live_requests"] == 0


# ------------------------------------------------------------------ malformed input


def test_malformed_frames_get_errors_and_the_connection_survives(daemon):
    bad_bodies = [b"\xc1garbage", b"", b"\x93\x01\x02\x03", b"\x81\xa4type\xa4nope", b"\x81\xa4type\xa5\xff\xfe\xfd\xfc\xfb"]
    with daemon.raw() as conn:
        for body in bad_bodies:
            conn.send_bytes(encode_raw_frame(body))
            err = conn.recv()
            assert isinstance(err, ErrorFrame) and err.code == "invalid_request" and err.id is None
        conn.send(HealthQuery())
        assert isinstance(conn.recv(), HealthFrame)


def test_too_large_is_answered_then_the_connection_closed(daemon):
    with daemon.raw() as conn:
        conn.send_bytes((2**32 - 1).to_bytes(4, "big") + b"\x00" * 100)
        err = conn.recv()
        assert isinstance(err, ErrorFrame) and err.code == "too_large"
        assert conn.recv() is None  # closed
    with daemon.client() as c:
        assert c.health().status == "ok"


def test_truncated_frames_and_dropped_connections_do_not_hurt(daemon):
    for junk in [b"\x00\x00", b"\x00\x00\x00\x10\x81", os.urandom(3000)]:
        with daemon.raw() as conn:
            conn.send_bytes(junk)
    with daemon.client() as c:
        assert c.health().status == "ok"


def test_slow_reader_is_cut_off_and_its_requests_aborted(tmp_path):
    with echo_daemon(tmp_path / "slow.sock", "--write-buffer-cap", "65536") as d:
        conn = d.raw()
        conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        try:
            for i in range(50):
                conn.send(GenerateFrame(id=f"x{i}", prompt_ids=ids(20000), max_tokens=20000))
        except (BrokenPipeError, ConnectionResetError):
            pass  # cut off while still sending: that is the point
        # The client reads nothing; the daemon must not queue 20000 frames per request for it.
        s = d.wait_stats(lambda s: s["slow_client_disconnects"] == 1 and s["running"] == 0)
        assert s["slow_client_disconnects"] == 1 and s["running"] == 0
        assert s["requests"] >= 1 and s["aborted"] == s["requests"] == s["disconnect_aborts"]
        assert s["tokens"] < s["requests"] * 20000 // 4
        with d.client() as c:
            assert c.complete(prompt_ids=[1, 2]).token_ids == [1, 2]
        conn.close()


# ------------------------------------------------------------------ limits and admission


def test_overloaded_by_engine_and_by_connection_limit(tmp_path):
    with echo_daemon(tmp_path / "o.sock", "--capacity", "3", "--max-live-per-connection", "2", "--tick-s", "0.01") as d:
        with d.raw() as a, d.raw() as b:
            a.send(GenerateFrame(id="1", prompt_ids=ids(5000)))
            a.send(GenerateFrame(id="2", prompt_ids=ids(5000)))
            a.send(GenerateFrame(id="3", prompt_ids=[1]))
            err = a.recv_until(lambda f: isinstance(f, ErrorFrame))[-1]
            assert err.id == "3" and err.code == "overloaded" and "max_live_per_connection" in err.message
            b.send(GenerateFrame(id="1", prompt_ids=ids(5000)))
            assert isinstance(b.recv(), AcceptedFrame)
            b.send(GenerateFrame(id="2", prompt_ids=[1]))
            err = b.recv_until(lambda f: isinstance(f, ErrorFrame))[-1]
            assert err.id == "2" and err.code == "overloaded" and "engine slots" in err.message


def test_drain_on_sigterm_answers_every_accepted_request(tmp_path):
    d = EchoDaemon(tmp_path / "t.sock", "--tick-s", "0.002", "--drain-timeout-s", "0.3")
    try:
        d.wait_ready()
        with d.raw() as conn:
            conn.send(GenerateFrame(id="short", prompt_ids=ids(20), max_tokens=20))
            conn.send(GenerateFrame(id="long", prompt_ids=ids(100000), max_tokens=100000))
            conn.recv_until(lambda f: isinstance(f, AcceptedFrame) and f.id == "long")
            d.proc.send_signal(signal.SIGTERM)
            time.sleep(0.05)
            conn.send(GenerateFrame(id="late", prompt_ids=[1]))
            frames = []
            while (f := conn.recv()) is not None:
                frames.append(f)
        ends = {f.id: f for f in frames if isinstance(f, (DoneFrame, ErrorFrame))}
        assert ends["short"].finish_reason == "eos"
        assert ends["long"].finish_reason == "aborted"  # past the drain timeout
        assert ends["late"].code == "shutting_down"
        assert sum(isinstance(f, (DoneFrame, ErrorFrame)) for f in frames) == 3
        assert d.proc.wait(10) == 0
    finally:
        d.kill()


# ------------------------------------------------------------------ the socket file and who may use it


def test_socket_mode_is_0660_and_the_group_is_applied(tmp_path):
    path = tmp_path / "m.sock"
    gid = os.getgid() if os.getuid() != 0 else 1  # root may give it to any group
    with echo_daemon(path, "--socket-group", str(gid)):
        st = os.stat(path)
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == gid
    with echo_daemon(path, "--socket-mode", "0600"):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_uid_allow_list_refuses_others(tmp_path):
    me = os.getuid()
    with echo_daemon(tmp_path / "u.sock", "--allow-uid", str(me)) as d:  # allowed: works
        with d.client() as c:
            assert c.health().status == "ok"
        d.kill()
    proc = EchoDaemon(tmp_path / "v.sock", "--allow-uid", str(me + 4242))
    try:
        deadline = time.monotonic() + 10
        while not os.path.exists(tmp_path / "v.sock") and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.1)
        with RawConn(tmp_path / "v.sock") as conn:
            err = conn.recv()
            assert isinstance(err, ErrorFrame) and err.id is None and "allowed_uids" in err.message
            assert f"uid {me}" in err.message
            assert conn.recv() is None
        with pytest.raises(ConnectionLost, match="allowed_uids"):
            with Client(tmp_path / "v.sock", timeout=5) as c:
                c.health()
    finally:
        proc.kill()


def test_stale_socket_file_is_replaced(tmp_path):
    path = tmp_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.close()  # the file stays, nobody listens: what a SIGKILLed daemon leaves
    with echo_daemon(path) as d:
        with d.client() as c:
            assert c.health().status == "ok"


def test_second_daemon_on_a_live_socket_refuses_to_start(tmp_path, daemon):
    second = subprocess.run(
        [sys.executable, "-m", "overlapd.daemon.echo_engine", "--socket", str(daemon.socket_path)],
        capture_output=True, text=True, timeout=20,
    )
    assert second.returncode != 0 and "Another" in second.stderr
    with daemon.client() as c:
        assert c.health().status == "ok"
    # A foreign listener (not an overlapd, no lock file) is respected too.
    foreign = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    foreign.bind(str(tmp_path / "f.sock"))
    foreign.listen()
    try:
        third = subprocess.run(
            [sys.executable, "-m", "overlapd.daemon.echo_engine", "--socket", str(tmp_path / "f.sock")],
            capture_output=True, text=True, timeout=20,
        )
        assert third.returncode != 0 and "answers on" in third.stderr
    finally:
        foreign.close()


def test_socket_activation_serves_the_inherited_socket(tmp_path):
    path = tmp_path / "act.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen()
    os.chmod(path, 0o666)  # systemd's SocketMode=; the daemon must leave it alone
    d = EchoDaemon(path, listen_sock=listener)
    listener.close()  # the daemon holds its copy, as with systemd
    try:
        d.wait_ready()
        with d.client() as c:
            assert c.complete(prompt_ids=[4, 2]).token_ids == [4, 2]
        assert d.terminate() == 0
        assert path.exists() and stat.S_IMODE(os.stat(path).st_mode) == 0o666  # systemd owns the file
    finally:
        d.kill()


def test_client_explains_a_missing_daemon(tmp_path):
    with pytest.raises(DaemonUnavailable, match="No overlapd socket"):
        Client(tmp_path / "nothing.sock", timeout=2)
