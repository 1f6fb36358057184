"""A ring reader in its own process, for the reliability tests: slow, stalled
or backpressured on purpose. It prints one JSON line per event on stdout:

    {"ready": pid}                                   after the reader is open
    {"seq": n, "step_id": s, "rows": [[request_id, [tokens...]], ...]}
    {"lost": [first_seq, last_seq]}                  the exact range it missed
    {"epoch": e} / {"gone": true} / {"closed": true}
    {"end": reason}                                  last line

    python tests/ring_child.py RING [--backpressure] [--delay S] [--stall S] [--idle S] [--max-s S]

`--delay`: sleep after every record (a slow consumer). `--stall`: open the
reader, then read nothing for S seconds (a stuck consumer). It stops at a
record with a negated step id, after `--idle` seconds without a record, or
after `--max-s` seconds in all: always bounded.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from overlapd.kernels.ring import (
    EpochChanged,
    Lost,
    ProducerClosed,
    ProducerGone,
    RingReader,
    Step,
)


def emit(obj: object) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("ring")
    ap.add_argument("--backpressure", action="store_true")
    ap.add_argument("--from-head", action="store_true")
    ap.add_argument("--delay", type=float, default=0.0)
    ap.add_argument("--stall", type=float, default=0.0)
    ap.add_argument("--idle", type=float, default=5.0)
    ap.add_argument("--max-s", type=float, default=120.0)
    args = ap.parse_args()
    reader = RingReader(args.ring, backpressure=args.backpressure, from_head=args.from_head)
    emit({"ready": os.getpid()})
    if args.stall:
        time.sleep(args.stall)
    deadline = time.monotonic() + args.max_s
    last_record = time.monotonic()
    reason = "max_s"
    while time.monotonic() < deadline:
        item = reader.read(timeout=0.1)
        if item is None:
            if time.monotonic() - last_record > args.idle:
                reason = "idle"
                break
            continue
        if isinstance(item, Step):
            v = item.view
            rows = [[int(rid), v.tokens[i, : v.accept_num[i], 0].tolist()] for i, rid in enumerate(v.request_id.tolist())]
            emit({"seq": item.seq, "step_id": v.step_id, "rows": rows})
            last_record = time.monotonic()
            if v.step_id < 0:
                reason = "last_record"
                break
            if args.delay:
                time.sleep(args.delay)
        elif isinstance(item, Lost):
            emit({"lost": [item.first_seq, item.last_seq]})
        elif isinstance(item, EpochChanged):
            emit({"epoch": item.epoch})
        elif isinstance(item, ProducerGone):
            emit({"gone": True})
        elif isinstance(item, ProducerClosed):
            emit({"closed": True})
    reader.close()
    emit({"end": reason})
    return 0


if __name__ == "__main__":
    sys.exit(main())
