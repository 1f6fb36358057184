"""Tensor parallelism on the CPU: two ranks over gloo give the tokens one rank gives.

The engine checks run in a subprocess (tests/tensor_parallel_check.py: torch
must not share this process with Paddle); the daemon checks run the real
`overlapd serve --runtime torch --tensor-parallel-size 2` on its real socket.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from daemon_harness import serve_real
from overlapd.daemon.protocol import DoneFrame, ErrorFrame, GenerateFrame, TokensFrame
from overlapd.stages.model.config import LlamaConfig
from overlapd.stages.model.llama import param_layout
from overlapd.stages.model.random_weights import random_weight
from overlapd.stages.model.tiny import write_hf_checkpoint

pytestmark = pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch is not installed (optional)")

CHECK = Path(__file__).with_name("tensor_parallel_check.py")
# SmolLM2's 9 query heads over 3 KV heads (two ranks: [6, 3] and [2, 1]) and an odd
# vocabulary (two ranks: 151 rows each, the second with one row of padding)
ODD = LlamaConfig(hidden_size=72, intermediate_size=150, num_hidden_layers=2, num_attention_heads=9,
                  num_key_value_heads=3, head_dim=8, vocab_size=301, max_position_embeddings=512,
                  tie_word_embeddings=False, bos_token_id=1, eos_token_ids=(2,))


def check(*args: str, timeout: float = 300) -> dict:
    out = subprocess.run([sys.executable, str(CHECK), *args], capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-4000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    r["stderr"] = out.stderr[-4000:]  # a spawned rank's own output lands here
    return r


@pytest.fixture(scope="module")
def odd_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("odd-llama")
    weights = {name: random_weight(ODD, name, shape, 3) for sources in param_layout(ODD).values()
               for name, shape in sources}
    write_hf_checkpoint(path, ODD, weights, None)
    return path


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    os.environ.setdefault("OVERLAPD_CACHE_DIR", str(tmp_path_factory.mktemp("tp-cache")))
    return check("engine", "tiny", "4", "24", "--more")


def test_two_ranks_give_one_ranks_greedy_tokens_on_the_tiny_model(tiny_run: dict) -> None:
    assert tiny_run["n2"] == tiny_run["n1"]
    assert all(len(t) == 24 for t in tiny_run["n1"]) and len({tuple(t) for t in tiny_run["n1"]}) == 4
    assert tiny_run["n2_sync"] == tiny_run["n1"][:2]
    assert tiny_run["tp_steps"] >= 24  # the steps went through rank 0's launch hook to the worker
    assert tiny_run["kv_heads_rank0"] == 1  # the tiny model's 2 KV heads, one per rank


def test_two_ranks_draw_one_ranks_seeded_samples_and_logprobs(tiny_run: dict) -> None:
    assert tiny_run["sampled_n2"] == tiny_run["sampled_n1"]
    assert len({tuple(t) for t in tiny_run["sampled_n1"]}) == 3
    assert tiny_run["sampled_logprob_err"] < 1e-4


def test_speculative_decoding_runs_per_rank(tiny_run: dict) -> None:
    """ngram drafts verified on two ranks: greedy verification emits plain greedy's tokens."""
    assert tiny_run["spec_n2"] == tiny_run["n1"]
    stats = tiny_run["spec_stats"]
    accepted = next(v for k, v in stats.items() if "accept" in k and "rate" not in k)
    assert accepted > 0, stats


def test_two_ranks_give_one_ranks_greedy_tokens_on_the_default_model() -> None:
    """SmolLM2-135M-Instruct: 9 query heads over 3 KV heads split [6, 3] / [2, 1]."""
    r = check("engine", "smollm2-135m-instruct", "3", "16")
    assert r["n2"] == r["n1"] and r["n2_sync"] == r["n1"][:2]
    assert all(len(t) == 16 for t in r["n1"]) and len({tuple(t) for t in r["n1"]}) == 3
    assert r["kv_heads_rank0"] == 2


def test_sharded_layers_with_gloo_collectives_equal_the_unsharded_model(odd_checkpoint: Path) -> None:
    r = check("layers", str(odd_checkpoint))
    assert r["worker_exit"] == 0, r["stderr"]
    assert r["q_heads"] == [6, 9] and r["kv_heads"] == [2, 3] and r["vocab_rows"] == 151
    assert r["embed_equal"]  # masked lookup + all-reduce: exact
    assert r["logits_shape"] == [6, 301]  # all-gathered, padding dropped
    assert r["logits_err"] < 1e-5
    assert r["forward_err"] < 1e-5 * max(1.0, r["forward_scale"])


def test_an_uneven_split_with_padding_generates_one_ranks_tokens(odd_checkpoint: Path) -> None:
    r = check("engine", str(odd_checkpoint), "4", "16")
    assert r["n2"] == r["n1"] and r["kv_heads_rank0"] == 2


# --- the daemon ------------------------------------------------------------------------------

def descendants(pid: int) -> list[int]:
    """Every process whose parent chain leads to `pid` (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def worker_pids(log: str, event: str = "tensor_parallel_ready") -> list[int]:
    """The worker pids the daemon logged with `event`."""
    for line in log.splitlines():
        if f'"{event}"' in line:
            return json.loads(line)["worker_pids"]
    raise AssertionError(f"no {event} line in {log[-2000:]}")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"


def test_the_daemon_serves_tokens_from_two_ranks_and_stops_its_workers(tmp_path: Path, tiny_run: dict) -> None:
    d = serve_real(tmp_path, "--runtime", "torch", "--tensor-parallel-size", "2")
    try:
        workers = worker_pids(d.log_path.read_text())
        assert len(workers) == 1 and workers[0] in descendants(d.proc.pid)
        with d.client() as c:
            done = c.complete("Hello there", max_tokens=24, temperature=0.0, ignore_eos=True)
        assert done.token_ids == tiny_run["n1"][0]  # the engine check's N=1 tokens for the same prompt
        assert d.terminate() == 0
        assert not alive(workers[0])
    finally:
        d.kill()


def test_a_killed_worker_fails_the_request_and_the_daemon_exits_nonzero(tmp_path: Path) -> None:
    d = serve_real(tmp_path, "--runtime", "torch", "--tensor-parallel-size", "2", "--no-ring")
    try:
        family = descendants(d.proc.pid)
        worker = worker_pids(d.log_path.read_text())[0]
        with d.raw() as conn:
            conn.send(GenerateFrame(id="long", prompt="Hello", max_tokens=2000, temperature=0.0, ignore_eos=True))
            frames = conn.recv_until(lambda f: isinstance(f, TokensFrame))  # it is generating
            os.kill(worker, signal.SIGKILL)
            t0 = time.monotonic()
            frames += conn.recv_until_end("long")
        end = frames[-1]
        assert isinstance(end, ErrorFrame) and not any(isinstance(f, DoneFrame) for f in frames)
        assert end.code == "internal" and "worker rank 1" in end.message and "signal 9" in end.message
        code = d.proc.wait(10)
        assert code != 0 and time.monotonic() - t0 < 10
        deadline = time.monotonic() + 5
        while any(alive(p) for p in family) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not [p for p in family if alive(p)], "a process of the daemon outlived it"
        assert '"tensor_parallel_failed"' in d.log_path.read_text()
    finally:
        d.kill()


def test_a_model_that_cannot_load_fails_the_start_and_stops_the_workers(tmp_path: Path) -> None:
    """Every rank refuses the tiny model with a context longer than its 2048 positions."""
    out = subprocess.run([sys.executable, "-m", "overlapd.daemon", "serve", "--socket", str(tmp_path / "s"),
                          "--no-ring", "--model", "tiny", "--runtime", "torch", "--tensor-parallel-size", "2",
                          "--max-model-len", "4096"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 1, out.stderr[-2000:]
    assert "max_model_len 4096 exceeds the model's max_position_embeddings 2048" in out.stderr
    pids = worker_pids(out.stdout, "tensor_parallel_starting")
    assert len(pids) == 1 and not alive(pids[0])


def test_the_paddle_runtime_refuses_more_than_one_rank(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "overlapd.daemon", "serve", "--socket", str(tmp_path / "s"),
                          "--model", "tiny", "--runtime", "paddle", "--tensor-parallel-size", "2"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "needs the torch runtime" in out.stderr

