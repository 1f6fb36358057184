"""`overlapd tail`: the ring as JSON lines (SPEC.md section 3)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

import msgspec
from overlapd.kernels.ring import DEFAULT_RING_PATH


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", nargs="?", default=DEFAULT_RING_PATH, help=f"ring file (default {DEFAULT_RING_PATH})")
    parser.add_argument("--from-head", action="store_true", help="start at the oldest intact record instead of the live tail")
    parser.add_argument("--count", type=int, default=0, metavar="N", help="exit after N STEP records")


def step_json(seq: int, publish_ns: int, view: Any) -> dict[str, Any]:
    """One STEP record as SPEC 3 prints it: only each row's accept_num entries."""
    tokens = view.tokens.tolist()  # [bsz][T][k+1], one conversion for the whole record
    accept = view.accept_num.tolist()
    logprobs = view.logprobs.tolist() if view.k else None
    ranks = view.ranks.tolist() if view.k else None
    rows = []
    for i, (rid, fin) in enumerate(zip(view.request_id.tolist(), view.finish.tolist())):
        n = accept[i]
        row: dict[str, Any] = {"request_id": rid, "finish": fin, "tokens": [c[0] for c in tokens[i][:n]]}
        if view.k:
            row["logprobs"] = [c[0] for c in logprobs[i][:n]]
            row["ranks"] = ranks[i][:n]
            row["top"] = [
                [[tok, lp] for tok, lp in zip(tokens[i][t][1:], logprobs[i][t][1:])] for t in range(n)
            ]
        rows.append(row)
    return {
        "seq": seq,
        "step_id": view.step_id,
        "flag": view.flag,
        "k": view.k,
        "T": view.T,
        "publish_ns": publish_ns,
        "rows": rows,
    }


def run(args: argparse.Namespace) -> int:
    from overlapd.kernels.ring import (
        EpochChanged,
        Lost,
        ProducerGone,
        RingError,
        RingReader,
        Step,
    )

    if args.count < 0:
        print("overlapd tail: --count must be >= 0", file=sys.stderr)
        return 2
    try:
        reader = RingReader(args.path, from_head=args.from_head)
    except (RingError, OSError) as exc:
        print(f"overlapd tail: {args.path}: {exc}", file=sys.stderr)
        return 1
    encoder = msgspec.json.Encoder()
    out = sys.stdout.buffer
    seen = 0
    with reader:
        while True:
            # Short waits keep Ctrl-C responsive: the native wait holds no GIL but
            # Python only handles signals between calls.
            item = reader.read(timeout=0.2)
            if item is None:
                continue
            if isinstance(item, Step):
                line = step_json(item.seq, item.publish_ns, item.view)
            elif isinstance(item, Lost):
                line = {"event": "lost", "records": item.records}
            elif isinstance(item, EpochChanged):
                line = {"event": "epoch", "epoch": item.epoch}
            elif isinstance(item, ProducerGone):
                line = {"event": "producer_gone"}
            else:
                continue  # a clean close: the negated last record already ended us, or a new producer may come
            out.write(encoder.encode(line) + b"\n")
            out.flush()
            if isinstance(item, Step):
                seen += 1
                if item.view.step_id < 0 or (args.count and seen >= args.count):
                    return 0
