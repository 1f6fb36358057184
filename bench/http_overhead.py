"""HTTP API vs socket protocol, same daemon, same run (issue 14).

Starts the real daemon (`overlapd serve --model tiny --http 127.0.0.1:0`) and
drives it with `overlapd bench --json` alternately over the unix socket and
over `--http`, with the same concurrent streams, prompts and output length.
Besides throughput and latency it reads the daemon's CPU time (all threads,
/proc/PID/stat) around each pass: the daemon's own cost per token on each
path, which is what the HTTP front end adds, whatever the bench client costs.

    python bench/http_overhead.py                              # 64 streams, 3 rounds each
    python bench/http_overhead.py --clients 64 --requests 256 --max-tokens 64 --rounds 3 --json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from http_harness import serve_http  # noqa: E402

TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * TICK_S  # utime + stime, all threads


def one_pass(d, path: str, args: argparse.Namespace) -> dict:
    target = ["--http", d.base_url] if path == "http" else ["--socket", str(d.socket_path)]
    cmd = [sys.executable, "-m", "overlapd.daemon", "bench", *target, "--clients", str(args.clients),
           "--requests", str(args.requests), "--max-tokens", str(args.max_tokens),
           "--prompt-len", str(args.prompt_len), "--json"]
    c0, t0 = cpu_s(d.proc.pid), time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    wall, cpu = time.perf_counter() - t0, cpu_s(d.proc.pid) - c0
    if done.returncode != 0:
        raise RuntimeError(f"{path} bench failed: {done.stdout[-500:]} {done.stderr[-1500:]}")
    out = json.loads(done.stdout)
    tokens = out["output_tokens_per_s"] * out["elapsed_s"]
    out["daemon_cpu_us_per_token"] = 1e6 * cpu / tokens
    out["wall_s"] = wall
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        d = serve_http(Path(tmp), "--no-ring", "--max-num-seqs", str(max(args.clients, 1)))
        try:
            one_pass(d, "socket", argparse.Namespace(**{**vars(args), "requests": args.clients}))  # warm-up
            runs: dict[str, list[dict]] = {"socket": [], "http": []}
            for _ in range(args.rounds):
                for path in ("socket", "http"):
                    runs[path].append(one_pass(d, path, args))
        finally:
            d.terminate()
    med = {
        path: {
            "output_tokens_per_s": statistics.median(r["output_tokens_per_s"] for r in rs),
            "itl_p50_ms": statistics.median(r["itl_ms"]["p50"] for r in rs),
            "ttft_p50_ms": statistics.median(r["ttft_ms"]["p50"] for r in rs),
            "daemon_cpu_us_per_token": statistics.median(r["daemon_cpu_us_per_token"] for r in rs),
        }
        for path, rs in runs.items()
    }
    s, h = med["socket"], med["http"]
    summary = {
        "machine": f"{platform.node()} {os.cpu_count()} CPUs",
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "args": vars(args),
        "median": med,
        "http_over_socket": {
            "daemon_cpu_us_per_token": h["daemon_cpu_us_per_token"] - s["daemon_cpu_us_per_token"],
            "wall_us_per_token": 1e6 / h["output_tokens_per_s"] - 1e6 / s["output_tokens_per_s"],
            "throughput_ratio": h["output_tokens_per_s"] / s["output_tokens_per_s"],
        },
        "runs": runs,
    }
    if args.json:
        print(json.dumps(summary, indent=1))
        return 0
    print(f"{args.clients} streams, {args.requests} requests x {args.max_tokens} tokens, {args.rounds} rounds (medians)")
    print(f"{'path':<8} {'tok/s':>9} {'ITL p50 ms':>11} {'TTFT p50 ms':>12} {'daemon CPU us/token':>20}")
    for path, m in med.items():
        print(f"{path:<8} {m['output_tokens_per_s']:9.1f} {m['itl_p50_ms']:11.2f} {m['ttft_p50_ms']:12.1f} "
              f"{m['daemon_cpu_us_per_token']:20.1f}")
    o = summary["http_over_socket"]
    print(f"HTTP adds {o['daemon_cpu_us_per_token']:.1f} us of daemon CPU and {o['wall_us_per_token']:.1f} us of wall "
          f"time per token; throughput {o['throughput_ratio']:.2f}x of the socket's")
    return 0


if __name__ == "__main__":
    sys.exit(main())
