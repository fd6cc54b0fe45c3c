"""The benchmark's subscriber process: takes every message and stamps its arrival, torch-free.

It is the leaf of the flow: for each message it keeps (frame id, seq, CLOCK_MONOTONIC receive
time, wall-clock receive time, the header's wall-clock ``source`` stamp). Rows go into a
preallocated array that doubles when full, so a soak run does not allocate per frame either.
It stops on SIGTERM/SIGINT and writes an .npz plus a small JSON of its counters.

    python -m fluorosam_rt.bench.subscriber ENDPOINT OUT_PREFIX [--topic bench]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence

import numpy as np

from fluorosam_rt.bench.procs import stop_on_signals

COLUMNS = ("frame_id", "seq", "recv_mono_ns", "recv_wall_ns", "source_wall_ns", "prompts")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fluorosam_rt.bench.subscriber")
    ap.add_argument("endpoint")
    ap.add_argument("out", help="output prefix: writes OUT.npz and OUT.json")
    ap.add_argument("--topic", default="")
    ap.add_argument("--rcvhwm", type=int, default=64)
    args = ap.parse_args(argv)

    from bridge import Subscriber, SubscriberTimeout

    stop = stop_on_signals()
    rows = np.zeros((4096, len(COLUMNS)), dtype=np.int64)
    n = 0
    errors = 0
    with Subscriber(args.endpoint, topic=args.topic, rcvhwm=args.rcvhwm) as sub:
        time.sleep(0.2)  # the subscription reaches the publisher before the node starts
        print(json.dumps({"event": "ready"}), flush=True)
        while not stop.is_set():
            try:
                msg = sub.receive(timeout=0.2, newest=False)
            except SubscriberTimeout:
                continue
            except Exception:  # a malformed message is counted, the run goes on
                errors += 1
                continue
            mono, wall = time.monotonic_ns(), time.time_ns()
            if n == rows.shape[0]:
                rows = np.concatenate([rows, np.zeros_like(rows)])
            t = msg.timestamps_ns
            rows[n] = (msg.frame_id, msg.seq, mono, wall, t.get("source", 0), len(msg.prompts))
            n += 1
        # first/last seq: with received and lost, what the publisher numbered, counted from outside
        seqs = rows[:n, 1]
        counters = {
            "received": n,
            "skipped": sub.skipped,
            "lost": sub.lost,
            "errors": errors,
            "first_seq": int(seqs[0]) if n else None,
            "last_seq": int(seqs[-1]) if n else None,
        }
    np.savez(args.out + ".npz", rows=rows[:n], columns=np.array(COLUMNS))
    with open(args.out + ".json", "w") as f:
        json.dump(counters, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
