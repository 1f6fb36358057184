"""Ring benchmark: publish -> consume latency and throughput, cross-process.

Compares, in one run and on the same machine:
  ring/native   the ring driven by native loops on both ends (the transport's own cost)
  ring/spin     the same, readers spinning up to 200 us before they sleep (latency mode)
  ring/python   the ring through its Python API (RingWriter.publish / RingReader.next)
  mp.Queue      multiprocessing.Queue, one queue per reader (broadcast by hand)
  socketpair    AF_UNIX stream socketpair, one per reader

Latency is receipt time minus the publish time (CLOCK_MONOTONIC, shared by all
processes on the host) at a paced rate; throughput is records delivered per
second per reader with the producer going flat out. Ratios are against
mp.Queue measured in the same run.

    python bench/ring.py            # full run (a few minutes on 2 cores)
    python bench/ring.py --quick    # smaller counts
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import socket
import struct
import tempfile
import time
from dataclasses import dataclass

import numpy as np

from overlapd.kernels import _native

SIZES = {"64B": 64, "1KiB": 1024, "64KiB": 65536}
RING_HEADER = 24


@dataclass
class Result:
    transport: str
    size: str
    readers: int
    p50_us: float = float("nan")
    p99_us: float = float("nan")
    rate: float = float("nan")  # records/s delivered, mean over readers
    lost: int = 0


def ring_dir() -> str:
    return "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()


def body_len(size: int) -> int:
    """Body bytes of a ring record whose whole length (header included) is `size`."""
    return max(8, size - RING_HEADER)


# ---------------------------------------------------------------- child roles
SPIN_NS = {"ring/native": 4_000, "ring/spin": 200_000}


def ring_native_reader(path: str, count: int, spin_ns: int, conn, ready) -> None:
    reader = _native.RingReader(path, spin_ns=spin_ns)
    ready.set()
    res = reader.bench_consume(count, 30_000, True)
    lat = np.asarray(res["latency_ns"], dtype=np.int64)
    conn.send_bytes(json.dumps(summary(lat, res["received"], res["lost"], res.get("elapsed_ns", 0))).encode())


def ring_python_reader(path: str, count: int, conn, ready) -> None:
    reader = _native.RingReader(path)
    ready.set()
    lat = np.empty(count, dtype=np.int64)
    got = lost = 0
    first = last = 0
    deadline = time.monotonic() + 30
    while got + lost < count and time.monotonic() < deadline:
        item = reader.next(1000)
        if item[0] == "record":
            now = time.monotonic_ns()
            lat[got] = now - item[2]
            got += 1
            first = first or now
            last = now
        elif item[0] == "lost":
            lost += item[2] - item[1] + 1
    conn.send_bytes(json.dumps(summary(lat[:got], got, lost, last - first)).encode())


def queue_reader(q, count: int, conn, ready) -> None:
    ready.set()
    lat = np.empty(count, dtype=np.int64)
    first = last = 0
    for i in range(count):
        msg = q.get(timeout=30)
        now = time.monotonic_ns()
        lat[i] = now - struct.unpack_from("<q", msg)[0]
        first = first or now
        last = now
    conn.send_bytes(json.dumps(summary(lat, count, 0, last - first)).encode())


def socket_reader(sock: socket.socket, size: int, count: int, conn, ready) -> None:
    ready.set()
    lat = np.empty(count, dtype=np.int64)
    buf = bytearray(size)
    view = memoryview(buf)
    first = last = 0
    for i in range(count):
        got = 0
        while got < size:
            n = sock.recv_into(view[got:], size - got)
            if n == 0:
                raise EOFError("producer closed early")
            got += n
        now = time.monotonic_ns()
        lat[i] = now - struct.unpack_from("<q", buf)[0]
        first = first or now
        last = now
    conn.send_bytes(json.dumps(summary(lat, count, 0, last - first)).encode())


def summary(lat: np.ndarray, received: int, lost: int, elapsed_ns: int) -> dict:
    out = {"received": int(received), "lost": int(lost), "elapsed_ns": int(elapsed_ns)}
    if len(lat):
        out["p50_ns"] = float(np.percentile(lat, 50))
        out["p99_ns"] = float(np.percentile(lat, 99))
    return out


# ---------------------------------------------------------------- producers
def pace(interval_ns: int, start: int, i: int) -> None:
    target = start + i * interval_ns
    while time.monotonic_ns() < target:
        pass


def run_case(transport: str, size: int, readers: int, count: int, interval_ns: int) -> list[dict]:
    """Start the readers, produce `count` records, gather each reader's summary."""
    ctx = mp.get_context("spawn")
    readies = [ctx.Event() for _ in range(readers)]
    pipes = [ctx.Pipe(duplex=False) for _ in range(readers)]
    procs = []
    writer = queues = socks = None
    path = os.path.join(ring_dir(), f"overlapd-bench-{os.getpid()}.ring")
    if transport.startswith("ring"):
        capacity = 1 << 26  # 64 MiB: room for 1000 records of 64 KiB
        writer = _native.RingWriter(path, capacity, 256, 0, "bench", 0o600, False)
        if transport == "ring/python":
            target, args = ring_python_reader, [(path, count) for _ in range(readers)]
        else:
            target, args = ring_native_reader, [(path, count, SPIN_NS[transport]) for _ in range(readers)]
    elif transport == "mp.Queue":
        queues = [ctx.Queue(maxsize=1024) for _ in range(readers)]
        target = queue_reader
        args = [(q, count) for q in queues]
    else:
        socks = [socket.socketpair() for _ in range(readers)]
        target = socket_reader
        args = [(b, size, count) for _, b in socks]
    for i in range(readers):
        p = ctx.Process(target=target, args=(*args[i], pipes[i][1], readies[i]), daemon=True)
        p.start()
        procs.append(p)
    for ev in readies:
        if not ev.wait(60):
            raise RuntimeError(f"{transport} reader did not start")
    time.sleep(0.05)  # let readers reach their wait

    payload = bytearray(size)
    if transport in SPIN_NS:
        writer.bench_publish(count, body_len(size), interval_ns, 0)
    elif transport == "ring/python":
        start = time.monotonic_ns()
        for i in range(count):
            if interval_ns:
                pace(interval_ns, start, i)
            writer.publish(payload[: body_len(size)])
    else:
        start = time.monotonic_ns()
        for i in range(count):
            if interval_ns:
                pace(interval_ns, start, i)
            struct.pack_into("<q", payload, 0, time.monotonic_ns())
            msg = bytes(payload)
            if queues is not None:
                for q in queues:
                    q.put(msg)
            else:
                for a, _ in socks:
                    a.sendall(msg)
    results = [json.loads(r.recv_bytes()) for r, _ in pipes if r.poll(60)]
    for p in procs:
        p.join(10)
    if writer is not None:
        writer.close(True)
        os.unlink(path)
    return results


def measure(transport: str, size_name: str, readers: int, count: int, interval_ns: int, mode: str) -> Result:
    res = run_case(transport, SIZES[size_name], readers, count, interval_ns)
    out = Result(transport, size_name, readers)
    if not res:
        return out
    if mode == "latency":
        out.p50_us = float(np.median([r["p50_ns"] for r in res if "p50_ns" in r])) / 1e3
        out.p99_us = float(np.max([r["p99_ns"] for r in res if "p99_ns" in r])) / 1e3
    else:
        rates = [r["received"] / (r["elapsed_ns"] / 1e9) for r in res if r["elapsed_ns"] > 0]
        out.rate = float(np.mean(rates)) if rates else float("nan")
    out.lost = sum(r["lost"] for r in res)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller counts, for a smoke run")
    ap.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = ap.parse_args()
    scale = 0.1 if args.quick else 1.0
    transports = ["ring/native", "ring/spin", "ring/python", "mp.Queue", "socketpair"]

    lat_rows: list[Result] = []
    thr_rows: list[Result] = []
    for size_name in SIZES:
        for readers in (1, 4):
            for t in transports:
                n = int((3000 if size_name != "64KiB" else 1000) * scale) or 50
                lat_rows.append(measure(t, size_name, readers, n, 50_000, "latency"))  # 20k records/s
                n = int((200_000 if size_name != "64KiB" else 5_000) * scale)
                if t in ("mp.Queue", "socketpair"):
                    n = max(n // 20, 100)  # these are 10-100x slower; keep the run short
                thr_rows.append(measure(t, size_name, readers, n, 0, "throughput"))

    def baseline(rows: list[Result], r: Result) -> Result:
        return next(b for b in rows if b.transport == "mp.Queue" and b.size == r.size and b.readers == r.readers)

    print(f"\nLatency, paced at 20k records/s (p50 / p99 microseconds; ratio = mp.Queue p50 / this p50)")
    print(f"{'transport':<12} {'size':>6} {'readers':>7} {'p50 us':>9} {'p99 us':>9} {'vs Queue':>9} {'lost':>6}")
    for r in lat_rows:
        ratio = baseline(lat_rows, r).p50_us / r.p50_us
        print(f"{r.transport:<12} {r.size:>6} {r.readers:>7} {r.p50_us:>9.1f} {r.p99_us:>9.1f} {ratio:>8.1f}x {r.lost:>6}")
    print(f"\nThroughput, producer flat out (records/s delivered per reader; ratio = this / mp.Queue)")
    print(f"{'transport':<12} {'size':>6} {'readers':>7} {'rec/s':>12} {'vs Queue':>9} {'lost':>8}")
    for r in thr_rows:
        ratio = r.rate / baseline(thr_rows, r).rate
        print(f"{r.transport:<12} {r.size:>6} {r.readers:>7} {r.rate:>12,.0f} {ratio:>8.1f}x {r.lost:>8}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"latency": [r.__dict__ for r in lat_rows], "throughput": [r.__dict__ for r in thr_rows]}, f, indent=1)


if __name__ == "__main__":
    main()
