"""`overlapd generate` as a newcomer runs it: the README's first command, and its errors."""

from __future__ import annotations

import subprocess
import sys

GENERATE = [sys.executable, "-m", "overlapd.daemon", "generate"]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*GENERATE, *args], capture_output=True, text=True, timeout=300)


def test_the_readme_command_answers_hello_in_english_on_stdout_alone() -> None:
    proc = run("--chat", "Hello")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "Hello! How can I assist you today?\n"  # greedy, the text README shows
    assert proc.stderr.strip() == "[eos: 31 prompt + 10 generated tokens]"


def test_a_model_that_cannot_load_is_one_line_on_stderr() -> None:
    proc = run("--model", "/no/such/model.gguf", "x")
    assert proc.returncode == 1
    assert proc.stderr.startswith("overlapd generate: model '/no/such/model.gguf': no such directory or .gguf file")
    assert "Traceback" not in proc.stderr and proc.stdout == ""


def test_chat_needs_the_model_in_this_process() -> None:
    proc = run("--chat", "--socket", "/nonexistent.sock", "Hello")
    assert proc.returncode == 2 and "cannot be combined with --socket" in proc.stderr
